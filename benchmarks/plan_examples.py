"""The planner's verdicts for three well-known shapes on 8 x 80 GB GPUs, and the settings that make each fit.

Only config.json is written (a Qwen2Config / LlamaConfig with the published shapes): no weights, no
download. Every run: 64 pairs a step, data.max_length 2048, bf16 (mixed_precision auto on a GPU),
resident reference, full fine-tuning, no eval set; the completion fraction is the planner's default.

    python benchmarks/plan_examples.py
    python benchmarks/plan_examples.py --gpu-memory-gib 40 --gpus 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

SHAPES = {  # name: (config class, keywords)
    "Qwen2.5-0.5B": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                          num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                          tie_word_embeddings=True)),
    "Llama-2-7B": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "Llama-2-70B": ("LlamaConfig", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
}


def print_examples(gpus: int = 8, gpu_memory_gib: float = 80.0, batch: int = 64, max_length: int = 2048) -> None:
    import transformers

    from mdpo_ray.config import load_config
    from mdpo_ray.planning import planner

    print(f"\nplanner verdicts: {gpus} x {gpu_memory_gib:g} GiB, batch {batch} pairs, max_length {max_length}, "
          "bf16, full fine-tuning, resident reference")
    with tempfile.TemporaryDirectory() as root:
        for name, (config_class, keywords) in SHAPES.items():
            model_dir = Path(root) / name
            getattr(transformers, config_class)(**keywords).save_pretrained(model_dir)
            cfg = load_config(None, [f"model.name_or_path={model_dir}", "data.train=pairs.jsonl",
                                     "scaling.use_gpu=true", f"scaling.num_workers={gpus}",
                                     f"optim.batch_size={batch}", f"data.max_length={max_length}"])
            plan = planner.plan(cfg, gpu_memory_gib=gpu_memory_gib)
            print(f"{name}-shaped ({plan.shape.params / 1e9:.2f}B params), micro-batch {cfg.micro_batch_size}: "
                  + planner.one_line(plan).removeprefix("plan: "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    args = parser.parse_args()
    print_examples(args.gpus, args.gpu_memory_gib)


if __name__ == "__main__":
    main()
