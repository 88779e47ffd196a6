"""A causal LM's shape for the memory planner, read from its config alone: built on the meta device.

Nothing is allocated and no weights are read (a hub id fetches config.json only), so parameters are
counted exactly per FSDP2 unit, as distributed.shard_model finds the units, tied heads once and LoRA
adapters as peft makes them. A 70B model builds in about a second.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

from mdpo_ray import storage
from mdpo_ray.config import BUILTIN, ConfigError, LoraConfig, RunConfig
from mdpo_ray.planning.footprint import ModelShape

_ATTENTION_INPUTS, _MLP_INPUTS = {"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}
_LLAMA_LINEARS = _ATTENTION_INPUTS | _MLP_INPUTS | {"o_proj", "down_proj"}


def model_shape(cfg: RunConfig) -> ModelShape:
    builtin = cfg.builtin.model_dump_json() if cfg.model.name_or_path == BUILTIN else None
    lora = cfg.model.lora.model_dump_json() if cfg.model.lora.r else None
    return _shape(cfg.model.name_or_path, cfg.model.trust_remote_code, builtin, lora, cfg.model.attn_implementation)


@lru_cache(maxsize=16)
def _shape(name: str, trust_remote_code: bool, builtin: str | None, lora: str | None,
           attention: str | None = None) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if builtin is not None:
        from mdpo_ray.config import BuiltinTaskConfig
        from mdpo_ray.task import arith

        config = arith.model_config(BuiltinTaskConfig.model_validate_json(builtin), arith.build_tokenizer())
    else:
        try:
            config = AutoConfig.from_pretrained(storage.staged(name, weights=False),  # on S3: config.json, no weights
                                                trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ConfigError(f"model.name_or_path={name}: cannot read its config ({reason})") from None
    lora_cfg = LoraConfig.model_validate_json(lora) if lora else None
    with torch.device("meta"), warnings.catch_warnings():  # no memory; a library's deprecation notes are not ours
        warnings.simplefilter("ignore")
        try:  # the kernel's own check (flash-attn installed, the model supporting it) before Ray starts
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                     attn_implementation=attention)
        except (ImportError, ValueError) as exc:
            if attention is None:
                raise
            reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ConfigError(f"model.attn_implementation={attention}: transformers refuses it for this model "
                              f"({reason}); use sdpa or eager, or null for transformers' choice") from None
        if lora_cfg:
            from mdpo_ray.training import lora as adapters

            model = adapters.wrap(model, lora_cfg)  # as the loop wraps the policy, target names checked
    return _count(model, config.get_text_config(), lora_cfg.r if lora_cfg else 0)


def _count(model, config, lora_rank: int) -> ModelShape:
    """Parameter counts per FSDP2 unit, found as distributed.shard_model finds them."""
    from mdpo_ray.training.distributed import decoder_blocks  # torch is loaded by now; the CLI's import stays light

    blocks = decoder_blocks(model)
    params = list(model.parameters())  # each tensor once: a tied head is the embedding
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    largest = blocks[sizes.index(max(sizes))]
    adapted = {n.rsplit(".", 1)[-1] for n, m in largest.named_modules() if hasattr(m, "lora_A")}
    known = adapted <= _LLAMA_LINEARS  # otherwise assume every linear input is kept
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads") if not hasattr(config, k)]
    if missing:  # the activations are those of a Llama-style block (footprint.layer_saved_per_token)
        raise ConfigError(f"the planner knows Llama-style blocks; {type(config).__name__} has no {', '.join(missing)}")
    heads = config.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in params), root_params=sum(p.numel() for p in params) - sum(sizes),
        block_params=max(sizes), blocks=len(blocks),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        trainable_block=sum(p.numel() for p in largest.parameters() if p.requires_grad),
        head_trainable=sum(p.numel() for p in model.get_output_embeddings().parameters() if p.requires_grad),
        hidden=config.hidden_size, intermediate=config.intermediate_size, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=config.vocab_size,
        eager_attention=model.config._attn_implementation == "eager",
        adapters_per_block=len(adapted), lora_rank=lora_rank,
        keeps_attention_input=not lora_rank or not known or bool(adapted & _ATTENTION_INPUTS),
        keeps_mlp_input=not lora_rank or not known or bool(adapted & _MLP_INPUTS),
        keeps_down_input=not lora_rank or not known or "down_proj" in adapted)
