"""One LoRA adapter for a whole iterate run (`iterate.rounds` > 0 with `export.lora: adapter`; docs/iterate.md).

Round i trains fresh adapters B_i A_i (rank r, scale s = alpha / r; Hu et al. 2021, "LoRA") on W_{i-1}, round i-1's
merged export, so the last of R rounds ends at W_0 + Σ_i s B_i A_i over the initial model W_0. That sum is one
adapter of rank R·r: its A the rounds' A matrices stacked along the rank (dim 0), its B theirs side by side (dim 1),
so that B A = Σ_i B_i A_i, and its alpha R·alpha, which keeps the scale alpha / r the rounds' own. Each merged export
stored W_{i-1} + s B_i A_i in the export's dtype (fp32), so over W_0 the stacked adapter gives the last round's
merged model up to one such rounding per round, not bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mdpo_ray import storage

WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "adapter_model.safetensors", "adapter_config.json", "README.md"  # peft's names
_A, _B = ".lora_A.weight", ".lora_B.weight"
# peft options under which the rounds' sum is not this stacking: a scale other than alpha / r (rsLoRA), a
# magnitude vector (DoRA), or a rank or alpha of its own for some layers.
_UNSTACKABLE = ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
# What every round must share: the same layers adapted at the same rank and scale.
_SHARED = ("peft_type", "r", "lora_alpha", "target_modules", "fan_in_fan_out")


def stack_adapters(adapters: list[tuple[dict[str, torch.Tensor], dict]], base_model: str
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter config) of the one adapter over `base_model` that adds what `adapters` (the rounds' peft
    adapters in round order, each its adapter_model.safetensors tensors and adapter_config.json) added one after
    the other; a ValueError naming the round and what keeps them from stacking."""
    if not adapters:
        raise ValueError("no adapter to stack: an iterate run has at least one round")
    first_tensors, first_config = adapters[0]
    for r, (tensors, config) in enumerate(adapters):
        _check_stackable(r, tensors, config, first_tensors, first_config)
    stacked = {key: torch.cat([tensors[key] for tensors, _ in adapters], dim=0 if key.endswith(_A) else 1)
               for key in first_tensors}
    rounds = len(adapters)
    return stacked, first_config | {"r": first_config["r"] * rounds, "lora_alpha": first_config["lora_alpha"] * rounds,
                                    "base_model_name_or_path": base_model}


def _check_stackable(r: int, tensors: dict[str, torch.Tensor], config: dict, first_tensors: dict[str, torch.Tensor],
                     first_config: dict) -> None:
    """A ValueError unless round r's adapter is a plain LoRA adapter of round 0's layers, rank and scale."""
    plain = "only plain LoRA adapters (scale alpha / r, one rank and alpha for every layer) stack into one"
    for key in _UNSTACKABLE:
        if config.get(key):
            raise ValueError(f"iterate round {r}'s adapter has {key}={config[key]!r}: {plain}")
    others = [key for key in tensors if not key.endswith((_A, _B))]
    if others:
        raise ValueError(f"iterate round {r}'s adapter holds {others[0]} ({len(others)} tensors in all) beside its "
                         f"lora_A and lora_B weights: {plain}")
    differing = [key for key in _SHARED if _comparable(config.get(key)) != _comparable(first_config.get(key))]
    if differing or tensors.keys() != first_tensors.keys():
        raise ValueError(f"iterate round {r}'s adapter differs from round 0's in "
                         f"{', '.join(differing) or 'the layers it adapts'}: the rounds of one run must share "
                         "model.lora; set it back to the earlier rounds' values, or start the run afresh under "
                         "another name")


def _comparable(value):
    """target_modules as a sorted list: peft writes a set of names as a list in arbitrary order."""
    return sorted(value) if isinstance(value, (list, tuple, set)) else value


def write_stacked(adapter_dirs: list[str], base_model: str, location: str, *, run_name: str) -> dict:
    """Stack the peft adapter directories `adapter_dirs` (the rounds', in order; local or s3://) into one at
    `location`, a peft adapter directory with the last round's tokenizer files and a model card; returns its
    adapter config. Reads every round's adapter at once: an adapter is small beside its model."""
    from safetensors.torch import load_file, save_file

    local = [Path(storage.staged(adapter_dir)) for adapter_dir in adapter_dirs]  # a node's copy of a remote one
    tensors, config = stack_adapters([(load_file(d / WEIGHTS_FILE), json.loads((d / CONFIG_FILE).read_text()))
                                      for d in local], base_model)
    with storage.local_dir(location) as out:  # object storage: written here, then uploaded
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})  # peft writes the same metadata
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for path in local[-1].iterdir():  # the tokenizer's files (not the staged copy's hidden marker)
            if path.is_file() and path.name not in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE) \
                    and not path.name.startswith("."):
                shutil.copy2(path, out / path.name)
        (out / CARD_FILE).write_text(model_card(run_name, base_model, len(adapter_dirs), config))
    return config


def model_card(run_name: str, base_model: str, rounds: int, config: dict) -> str:
    """The stacked adapter's README.md: what it is and how to load it; each round's export has the full card."""
    about = (f"The LoRA adapter of mdpo-ray iterate run `{run_name}`: the adapters of its {rounds} rounds stacked "
             f"into one of rank {config['r']} (lora_alpha {config['lora_alpha']:g}, the rounds' scale alpha / r) over "
             f"`{base_model}`, the model round 0 started from. Each round's export (`iterate/round_<r>/`) has its "
             "model card, with its data and held-out results; the last round's is this policy as a merged model, "
             "equal up to float rounding.")
    load = ["```python", "from peft import AutoPeftModelForCausalLM  # loads the base model, then the adapter", "",
            'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/directory")', "```"]
    return "\n".join(["---", "library_name: peft", "tags: [mdpo-ray, iterate]", "---", "", f"# {run_name}", "",
                      about, "", *load, ""])
