"""Build the policy and the frozen reference from a Hugging Face causal LM, and export the result."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from mdpo_ray import storage
from mdpo_ray.config import ModelConfig, is_jinja


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        storage.staged(cfg.tokenizer or cfg.name_or_path, weights=False), trust_remote_code=cfg.trust_remote_code
    )
    if cfg.chat_template:  # a Jinja template, or (made absolute by load_config) the file holding one
        tokenizer.chat_template = cfg.chat_template if is_jinja(cfg.chat_template) else \
            Path(cfg.chat_template).read_text()
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer of {cfg.tokenizer or cfg.name_or_path} has no eos token; completions must end with one"
        )
    if tokenizer.pad_token_id is None:
        # Padding is masked out everywhere, so reusing EOS is safe (the usual fix for Llama-style tokenizers).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig, *, trainable: bool, weights: bool = True,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """fp32 master weights on CPU; sharding moves them to the mesh device. (`dtype`: a model that only
    generates, a sampling actor's, may load in the dtype it computes in, at half the memory in bf16.)

    `weights=False` builds only the architecture, on the meta device (no memory, nothing read): ranks
    other than 0 do that and sharding fills their shards from rank 0, so a node holds one full copy of
    the model while loading, not one per GPU (torchtitan and torchtune load the same way).
    Dropout is switched off: with it the policy would differ from the reference at step 0, and DPO's
    implicit reward (the log-ratio) would be noise (the DPO reference code does the same).
    """
    if weights:
        model = AutoModelForCausalLM.from_pretrained(
            storage.staged(cfg.name_or_path), dtype=dtype, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        )
    else:
        config = AutoConfig.from_pretrained(storage.staged(cfg.name_or_path, weights=False),
                                            trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                attn_implementation=cfg.attn_implementation,
            )
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def export_pretrained(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, out_dir: Path
) -> Path:
    """Write a full (unsharded) state dict as a Hugging Face model directory, with its tokenizer.

    The model object only carries the architecture, config and generation settings (on the meta
    device): the weights written are `state_dict`'s, so rank 0 holds one full copy of the model here,
    not a second one read back from `cfg.name_or_path`. `state_dict` is emptied: save_pretrained lets
    go of each tensor once it is written.
    """
    model = load_causal_lm(cfg, trainable=False, weights=False)
    expected = set(model.state_dict())
    tied = {k for k in expected if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    missing, unexpected = expected - set(state_dict) - tied, set(state_dict) - expected
    assert not missing and not unexpected, (missing, unexpected)
    try:  # the base model's own (stop tokens, sampling defaults), not ones derived from its config
        model.generation_config = GenerationConfig.from_pretrained(storage.staged(cfg.name_or_path, weights=False),
                                                                   trust_remote_code=cfg.trust_remote_code)
    except OSError:  # it has no generation_config.json
        pass
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    return out_dir
