"""Fast tier: the precision `scaling.mixed_precision` resolves to on each device (no GPU needed: the
policy is only built, and the bf16 capability check is replaced)."""

import pytest
import torch

from mdpo_ray import distributed


@pytest.mark.parametrize(
    ("mode", "device", "native_bf16", "param_dtype"),
    [
        ("auto", "cpu", False, None),
        ("auto", "cuda", True, torch.bfloat16),  # A100, H100, ...
        ("auto", "cuda", False, None),  # V100, T4: bf16 only emulated, so fp32
        ("bf16", "cuda", False, torch.bfloat16),  # asked for explicitly
        ("fp32", "cuda", True, None),
    ],
)
def test_mixed_precision_is_bf16_only_where_asked_or_native(monkeypatch, mode, device, native_bf16, param_dtype):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16
                        or including_emulation)
    policy = distributed.mixed_precision(mode, torch.device(device))
    assert policy.param_dtype == param_dtype
    assert policy.reduce_dtype == (torch.float32 if param_dtype else None)


@pytest.mark.parametrize(("use_gpu", "backend"), [(True, "nccl"), (False, "gloo")])
def test_a_run_outside_ray_makes_an_nccl_group_on_a_gpu(monkeypatch, tiny_run_overrides, use_gpu, backend):
    """The benchmark calls the loop in-process: on a GPU its one-rank group must be NCCL, as Ray Train's is."""
    from mdpo_ray import train_loop
    from mdpo_ray.config import load_config

    class Stop(Exception):
        pass

    def record(backend):
        raise Stop(backend)

    monkeypatch.setattr(distributed, "device_for", lambda gpu, use_gpu: torch.device("cuda" if use_gpu else "cpu", 0))
    monkeypatch.setattr(distributed, "ensure_process_group", record)
    cfg = load_config(None, [*tiny_run_overrides, "scaling.num_workers=1", f"scaling.use_gpu={use_gpu}"])
    with pytest.raises(Stop, match=backend):
        train_loop.train(cfg, train_loop.Worker())
