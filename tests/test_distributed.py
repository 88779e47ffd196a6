"""Fast tier: the precision `scaling.mixed_precision` resolves to on each device (no GPU needed: the
policy is only built, and the bf16 capability check is replaced)."""

import pytest
import torch

from mdpo_ray.training import distributed


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
    from mdpo_ray.config import load_config
    from mdpo_ray.training import train_loop

    class Stop(Exception):
        pass

    def record(backend):
        raise Stop(backend)

    monkeypatch.setattr(distributed, "device_for", lambda gpu, use_gpu: torch.device("cuda" if use_gpu else "cpu", 0))
    monkeypatch.setattr(distributed, "ensure_process_group", record)
    cfg = load_config(None, [*tiny_run_overrides, "scaling.num_workers=1", f"scaling.use_gpu={use_gpu}"])
    with pytest.raises(Stop, match=backend):
        train_loop.train(cfg, train_loop.Worker())



_LOAD_ON_RANK0 = r"""
import gc
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mdpo_ray.training import distributed, model as model_lib, reference
from mdpo_ray.config import ModelConfig

rank, ranks, store, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", store=dist.FileStore(store, ranks), rank=rank, world_size=ranks)
reads = []
original = model_lib.AutoModelForCausalLM.from_pretrained
model_lib.AutoModelForCausalLM.from_pretrained = lambda *a, **k: reads.append(a) or original(*a, **k)
cpu = torch.device("cpu")
for case in sys.argv[5:]:  # e.g. untied-policy, tied-reference
    reads.clear()
    frozen = case.endswith("reference")
    policy = distributed.mixed_precision("bf16" if frozen else "fp32", cpu)
    model = model_lib.load_causal_lm(ModelConfig(name_or_path=f"{root}/{case.split('-')[0]}"),
                                     trainable=not frozen, weights=rank == 0)
    if frozen:
        model = reference._in_compute_dtype(model, policy)
    distributed.shard_model(model, distributed.make_mesh(cpu), policy, frozen=frozen)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(12).reshape(2, 6) % 20).logits
    gathered = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]  # after the forward
    torch.save({"reads": len(reads), "logits": logits, "buffers": dict(model.named_buffers()), "gathered": gathered,
                "full": distributed.full_state_dict(model)}, f"{root}/{case}-rank{rank}.pt")
# Tear down the way the training loop does (a barrier, then the group), with the last sharded model freed
# first: a gloo group whose FSDP2 state outlives destroy_process_group is destroyed during interpreter
# finalization, and one rank in many then died with "terminate called without an active exception".
del model
gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow  # two gloo processes
def test_across_ranks_only_rank0_reads_the_weights_and_every_rank_gets_them(tmp_path):
    """A node must not hold one full copy of the model per GPU while loading: the other ranks build the
    bare architecture on the meta device and receive their shards and buffers from rank 0. Checked for
    the fp32 policy and the bf16 frozen reference, with the head tied to the embeddings and not.

    The same run checks where each keeps its root (embeddings, final norm, head) after a no-grad forward:
    the policy keeps it gathered for the backward (FSDP2's default); a frozen reference has no backward
    to reshard it, so across ranks it reshards after each forward."""
    import copy
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    saved = {}
    for tied in ("untied", "tied"):
        torch.manual_seed(0)
        saved[tied] = LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=tied == "tied"))
        saved[tied].save_pretrained(tmp_path / tied)
    cases = ["untied-policy", "tied-policy", "untied-reference", "tied-reference"]
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD_ON_RANK0, str(r), "2", str(tmp_path / "store"),
                               str(tmp_path), *cases], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errs = [proc.communicate(timeout=180)[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for err in errs]
    for case in cases:
        rank0, rank1 = (torch.load(tmp_path / f"{case}-rank{r}.pt", weights_only=True) for r in range(2))
        assert (rank0["reads"], rank1["reads"]) == (1, 0), case
        model = saved[case.split("-")[0]]
        dtype = torch.bfloat16 if case.endswith("reference") else torch.float32
        expected = {k: v.to(dtype) for k, v in model.state_dict().items()}
        assert rank0["full"].keys() == expected.keys(), case
        for key, value in expected.items():
            assert torch.equal(rank0["full"][key], value), (case, key)  # the shards together: the saved weights
        for name, buffer in model.named_buffers():
            assert torch.equal(rank1["buffers"][name], buffer), (case, name)  # rotary frequencies (no state dict)
        assert torch.equal(rank0["logits"], rank1["logits"]), case
        head = [] if case.startswith("tied") else ["lm_head.weight"]  # a tied head is the embeddings
        root = ["model.embed_tokens.weight", "model.norm.weight", *head]
        gathered = [] if case.endswith("reference") else root
        assert [rank0["gathered"], rank1["gathered"]] == [gathered, gathered], case
        plain = copy.deepcopy(model)
        for param in plain.parameters():
            param.data = param.data.to(dtype)  # parameters only, as under FSDP2 (rotary frequencies stay fp32)
        with torch.no_grad():
            plain = plain(input_ids=torch.arange(12).reshape(2, 6) % 20).logits
        torch.testing.assert_close(rank0["logits"].float(), plain.float(), msg=case)

