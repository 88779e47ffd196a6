"""LoRA (model.lora.r > 0): peft adapters on the policy, the reference as the policy with them off, and export.

The policy is a peft model: its base weights are frozen and only the low-rank adapters train (Hu et al.
2021, "LoRA", eq. 3 with the alpha / r scaling of its section 4.1: h = W x + (alpha / r) B A x). B starts
at zero, so at step 1 the policy is exactly its base model, and with a resident reference Δw = Δl = 0
exactly, as in a full fine-tuning run. The reference is that same sharded module with its adapters
switched off: no second copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from mdpo_ray.config import ConfigError, ExportConfig, LoraConfig, ModelConfig
from mdpo_ray.training.model import export_pretrained, load_causal_lm

_LINEAR = (nn.Linear, Conv1D)  # Conv1D: GPT-2's linear layers
ADAPTER_DIR = "adapter"  # export.lora=both: the peft adapter's folder inside the merged model's


def linear_names(model: nn.Module) -> list[str]:
    """The last names of the model's linear layers (q_proj, k_proj, ...): what target_modules can name."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, _LINEAR)})


def check_targets(model: nn.Module, cfg: LoraConfig) -> None:
    """ConfigError unless every name in cfg.target_modules ends the name of a linear layer of `model`
    (peft's rule for a list of names: the module's full name, or its last dotted parts)."""
    if cfg.target_modules == "all-linear":
        return
    names = [name for name, module in model.named_modules() if isinstance(module, _LINEAR)]
    unknown = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown or not cfg.target_modules:
        raise ConfigError(
            f"model.lora.target_modules: {unknown or '[]'} names no linear layer of this "
            f"{type(model).__name__}; its linear layers are {', '.join(linear_names(model))} "
            "(or set model.lora.target_modules=all-linear: every one but the output head)"
        )


def check_config(cfg: ModelConfig) -> None:
    """check_targets on the architecture alone (the meta device: no weights read, no memory), so that a
    bad name fails before Ray starts rather than on every worker."""
    if cfg.lora.r and cfg.lora.target_modules != "all-linear":
        check_targets(load_causal_lm(cfg, trainable=False, weights=False), cfg.lora)


def wrap(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """`model` as a peft model whose only trainable parameters are the adapters.

    Call it before sharding on every rank, the meta-device models of ranks other than 0 included:
    sharding then fills every rank's adapters from rank 0's, so all ranks start from one random A.
    The peft model passes attribute reads through to the transformers model (`_no_split_modules`,
    `get_output_embeddings`), so sharding and the log-prob head hook see the usual decoder blocks and head.
    """
    import peft  # here, not at the top: a run without LoRA does not pay its import (~1.5 s per worker)

    check_targets(model, cfg)
    lora = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """While open, `model` (a wrap()ped model) computes its base model: for no-grad reference forwards.

    peft's disable_adapter() also clears the adapters' requires_grad; it is put back at once. FSDP2
    reads it at its first forward to fix each block's gradient dtypes, and at every unshard: a first
    forward with the adapters off left bf16 gradients that the fp32 master weights refuse in backward.
    Under no_grad the flag changes nothing.
    """
    trainable = [param for param in model.parameters() if param.requires_grad]
    with model.disable_adapter():
        for param in trainable:
            param.requires_grad_(True)
        yield


def export(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, export_cfg: ExportConfig,
           tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """Write the trained policy's full (unsharded) state dict, keyed as the wrap()ped model's, to `out_dir`.

    `merged`: a plain transformers model directory, each W replaced by W + (alpha / r) B A, loadable
    without peft. `adapter`: a peft adapter directory (the adapter alone suffices in `state_dict`),
    loaded with PeftModel.from_pretrained over the base model. `both`: the merged model in `out_dir` and the
    adapter in `out_dir/adapter` (an iterate round's export: the next round starts from the merged model, the
    run's final adapter stacks the rounds' ones). The tokenizer is saved beside each.
    The model object is only an architecture on the meta device that takes over `state_dict`'s tensors
    (the dict is emptied), so rank 0 holds one full copy of the model here, plus one merged layer at a time.
    """
    model = wrap(load_causal_lm(cfg, trainable=False, weights=False), cfg.lora)
    if export_cfg.lora != "merged":
        # The adapter first: the merge below takes over and empties `state_dict`, whose adapter tensors peft picks
        # out here (the frozen base weights of a `both` dict are left, not written).
        model.peft_config["default"].base_model_name_or_path = cfg.name_or_path
        adapter_dir = out_dir if export_cfg.lora == "adapter" else out_dir / ADAPTER_DIR
        adapter_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(adapter_dir, state_dict=state_dict)
        tokenizer.save_pretrained(adapter_dir)
        if export_cfg.lora == "adapter":
            return out_dir
    from peft.tuners.lora import LoraLayer

    model.load_state_dict(state_dict, assign=True)
    state_dict.clear()
    # A merge adds B A into the loaded weight in place (peft 0.22 does so under safe_merge too), and on one rank
    # the gathered state dict is the trained policy's own storage, which must not change under it. So each
    # adapted weight is merged into a copy of its own; the loaded one is freed as it is replaced wherever it
    # was the only reference (the gathered copy of several ranks): one layer's copy at a time.
    for layer in (module for module in model.modules() if isinstance(module, LoraLayer)):
        base = layer.get_base_layer()
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    return export_pretrained(model.merge_and_unload(safe_merge=True).state_dict(), cfg, tokenizer, out_dir)
