"""Log-prob masking and the chunked fp32 log-softmax, against a direct computation."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mdpo_ray.training import logps


def _direct(logits, input_ids, mask):
    """Sum over t>=1 with mask[t] of log_softmax(logits[t-1])[input_ids[t]], the textbook way."""
    full = torch.log_softmax(logits.double(), -1)
    out = torch.zeros(input_ids.shape[0], dtype=torch.float64)
    for i in range(input_ids.shape[0]):
        for t in range(1, input_ids.shape[1]):
            if mask[i, t]:
                out[i] += full[i, t - 1, input_ids[i, t]]
    return out


def test_sequence_logps_sums_only_masked_completion_tokens(monkeypatch):
    monkeypatch.setattr(logps, "CHUNK_FLOATS", 4 * 11 * 3)  # force chunks of 3 positions
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 11)
    input_ids = torch.randint(0, 11, (4, 9))
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[0, 3:7] = True
    mask[1, 1:9] = True
    mask[2, 5:6] = True  # a one-token completion; row 3 has none
    got = logps.sequence_logps(logits, input_ids, mask)
    torch.testing.assert_close(got.double(), _direct(logits, input_ids, mask), rtol=1e-5, atol=1e-5)
    assert got[3] == 0


def test_masked_positions_do_not_affect_result():
    """Changing a prompt or padding token's *target* (not its context) leaves the sum unchanged."""
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 7)
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[False, False, False, True, True, False]])
    changed = input_ids.clone()
    changed[0, 1] = 0  # prompt token
    changed[0, 5] = 0  # padding token
    assert logps.sequence_logps(logits, input_ids, mask) == logps.sequence_logps(logits, changed, mask)


def test_average_divides_by_completion_length():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 7)
    input_ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[False, True, True, True, True], [False, False, False, True, True]])
    total = logps.sequence_logps(logits, input_ids, mask)
    mean = logps.sequence_logps(logits, input_ids, mask, average=True)
    torch.testing.assert_close(mean, total / torch.tensor([4.0, 2.0]))


def test_chosen_token_mean_nll_divides_by_chosen_completion_tokens():
    """Two pairs, chosen rows first: the chosen rows score 3 and 1 tokens (loss_mask[:, 1:]), so summed
    log-probs (−6, −2) give token-mean NLL (2, 2); already length-averaged log-probs are only negated.
    The rejected rows' tokens do not count."""
    mask = torch.tensor([[False, False, True, True, True], [False, False, False, False, True],
                         [False, True, True, True, True], [False, True, True, True, True]])
    summed = torch.tensor([-6.0, -2.0])
    torch.testing.assert_close(logps.chosen_token_mean_nll(summed, mask, average=False), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(logps.chosen_token_mean_nll(summed, mask, average=True), torch.tensor([6.0, 2.0]))


def test_bf16_logits_are_reduced_in_fp32():
    torch.manual_seed(3)
    logits = torch.randn(2, 8, 50) * 5
    input_ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    out = logps.sequence_logps(logits.bfloat16(), input_ids, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _direct(logits.bfloat16().float(), input_ids, mask), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("full_logits", [False, True])
def test_chunked_log_softmax_gradient_matches_the_textbook_one(monkeypatch, full_logits):
    monkeypatch.setattr(logps, "CHUNK_FLOATS", 11 * 3)  # 3 rows (positions) a chunk
    torch.manual_seed(4)
    logits = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    input_ids = torch.randint(0, 11, (3, 7))
    weights = torch.randn(3, 6, dtype=torch.float64)
    if full_logits:
        got = logps.token_logps(logits, input_ids)
    else:  # the scored-rows path: (n, V) rows and their targets
        got = logps.picked_logps(logits[:, :-1].reshape(-1, 11), input_ids[:, 1:].reshape(-1)).view(3, 6)
    (got.double() * weights).sum().backward()
    ours, logits.grad = logits.grad, None
    (torch.log_softmax(logits, -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad, rtol=1e-5, atol=1e-6)  # the forward runs in fp32


def test_backward_keeps_the_logits_as_they_came_not_an_fp32_copy(monkeypatch):
    """Autograd through a chunked fp32 log-softmax would save each fp32 chunk: the whole fp32 copy after all."""
    monkeypatch.setattr(logps, "CHUNK_FLOATS", 50 * 4)  # 4 rows a chunk
    logits = torch.randn(16, 50, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = logps.picked_logps(logits, torch.randint(0, 50, (16,)))
    big = [t for t in saved if t.numel() >= 50]
    assert big and all(t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() for t in big)
    assert sum(t.numel() for t in saved if t.is_floating_point() and t.numel() < 50) <= 16  # a logsumexp per row
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def _tiny_causal_lm(kind: str):
    """A random 2-layer model: Llama (untied or tied head) or Gemma2 (soft-capped logits, scaled embeddings)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=8, final_logit_softcapping=0.5)).eval()
    return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=kind == "llama_tied")).eval()


def _padded_pairs():
    """(2B, T) = (6, 12), right-padded: prompts of 2-5 tokens, completions of 1-7 tokens, chosen rows first."""
    torch.manual_seed(4)
    spans = [(3, 5), (2, 7), (5, 1), (4, 4), (2, 6), (5, 2)]  # (prompt, completion) per row
    input_ids = torch.zeros(6, 12, dtype=torch.long)
    attention_mask, loss_mask = torch.zeros_like(input_ids), torch.zeros(6, 12, dtype=torch.bool)
    for row, (prompt, completion) in enumerate(spans):
        input_ids[row, : prompt + completion] = torch.randint(1, 61, (prompt + completion,))
        attention_mask[row, : prompt + completion] = 1
        loss_mask[row, prompt : prompt + completion] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    return logps.device_batch(batch, torch.device("cpu"))


def _naive_logps(model, batch, average):
    """The textbook way: full (2B, T, V) logits, full fp32 log-softmax, masked sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["loss_mask"][:, 1:].float()
    out = (full * mask).sum(-1)
    return out / mask.sum(-1) if average else out


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "gemma2"])
@pytest.mark.parametrize("average", [False, True])
def test_head_on_completion_rows_equals_full_log_softmax_in_value_and_gradient(kind, average):
    """The head sees only the scored rows, yet the log-probs and every parameter's gradient match the
    full-logits computation (padding included; Gemma2's soft-capping is applied by the model itself)."""
    model, batch = _tiny_causal_lm(kind), _padded_pairs()
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    chosen, rejected = logps.concatenated_logps(model, batch, average=average)
    hook.remove()
    assert calls == [(1, int(batch["loss_mask"][:, 1:].sum()), 32)]  # 25 of 72 positions through the head
    (chosen.sum() - 2 * rejected.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    expected = _naive_logps(model, batch, average)
    (expected[:3].sum() - 2 * expected[3:].sum()).backward()
    torch.testing.assert_close(torch.cat([chosen, rejected]), expected, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


class _Opaque(torch.nn.Module):
    """A model without get_output_embeddings: the head cannot be found, so log-probs take the full logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_a_model_without_a_separable_head_falls_back_to_full_logits():
    model, batch = _tiny_causal_lm("llama"), _padded_pairs()
    with torch.no_grad():
        got = torch.cat(logps.concatenated_logps(_Opaque(model), batch))
        torch.testing.assert_close(got, _naive_logps(model, batch, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("separable_head", [True, False])
def test_mean_logits_are_each_sequences_mean_over_completion_positions_and_vocab(monkeypatch, separable_head):
    """TRL's logits/chosen|rejected per pair: the full logits at the positions that score a completion token,
    averaged over those positions and the vocabulary; the same through the head hook and the fallback."""
    monkeypatch.setattr(logps, "CHUNK_FLOATS", 61 * 4)  # chunks of 4 of the 25 scored positions

    model, batch = _tiny_causal_lm("llama"), _padded_pairs()
    with torch.no_grad():
        chosen, rejected, chosen_logits, rejected_logits = logps.concatenated_logps(
            model if separable_head else _Opaque(model), batch, mean_logits=True)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    mask = batch["loss_mask"][:, 1:]
    expected = torch.stack([full[row, :-1][mask[row]].mean() for row in range(6)])
    torch.testing.assert_close(torch.cat([chosen_logits, rejected_logits]).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([chosen, rejected]), _naive_logps(model, batch, False), rtol=1e-5, atol=1e-5)


def _sharded_against_plain(kind: str, precision: str):
    """(log-probs, the unsharded model's, [(name, gradient, the unsharded model's)]) of one backward of
    the summed log-probs, the sharded model under FSDP2 with `precision`'s mixed-precision policy."""
    from mdpo_ray.training import distributed

    distributed.ensure_process_group()
    plain, batch = _tiny_causal_lm(kind), _padded_pairs()
    expected = _naive_logps(plain, batch, False)
    expected.sum().backward()
    sharded = distributed.shard_model(_tiny_causal_lm(kind), distributed.make_mesh(torch.device("cpu")),
                                      distributed.mixed_precision(precision, torch.device("cpu")))
    got = torch.cat(logps.concatenated_logps(sharded, batch))
    got.sum().backward()
    grads = dict(sharded.named_parameters())
    return got, expected, [(name, grads[name].grad.full_tensor(), p.grad) for name, p in plain.named_parameters()]


@pytest.mark.parametrize("kind", ["llama", "llama_tied"])
def test_head_on_completion_rows_under_fsdp2_matches_the_unsharded_model(kind):
    """fully_shard'ed blocks and root (embeddings, final norm, head): the model is still called as a whole, so
    FSDP2's root hooks gather the head before the hook hands it the scored rows."""
    got, expected, grads = _sharded_against_plain(kind, "fp32")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad, plain_grad in grads:
        torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["llama", "llama_tied"])
def test_bf16_mixed_precision_under_fsdp2_gives_fp32_logps_and_fp32_grads(kind):
    """The GPU recipe's precision (FSDP2 computes in bf16, reduces in fp32), run on CPU: the head hook
    meets bf16 hidden states and a bf16 head without a dtype clash, the log-probs come back fp32 and
    close to the fp32 model's, and the gradients land on the fp32 weights pointing the same way."""
    got, expected, grads = _sharded_against_plain(kind, "bf16")
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa (~0.4% per logit); over up to 7 tokens the sums differ by ~0.004 here.
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=1e-2)
    assert (got - expected).abs().max() > 1e-4  # and it did compute in bf16: fp32 agrees to ~1e-6
    for name, grad, plain_grad in grads:
        assert grad.dtype == torch.float32, name
        assert torch.nn.functional.cosine_similarity(grad.flatten(), plain_grad.flatten(), dim=0) > 0.999, name


_GATHERED_AFTER_FORWARD = r"""
import gc
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from mdpo_ray.training import distributed

rank, ranks, store, frozen = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "frozen"
dist.init_process_group("gloo", store=dist.FileStore(store, ranks), rank=rank, world_size=ranks)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).requires_grad_(not frozen)
cpu = torch.device("cpu")
distributed.shard_model(model, distributed.make_mesh(cpu), distributed.mixed_precision("fp32", cpu), frozen=frozen)
with torch.no_grad():
    model(input_ids=torch.randint(0, 64, (2, 6)))
print(" ".join(name for name, p in model.named_parameters() if not isinstance(p, DTensor)))
del model
gc.collect()  # FSDP2 state freed while the group lives (see test_distributed)
dist.barrier()
dist.destroy_process_group()
"""


def test_on_one_rank_a_frozen_model_keeps_its_root_gathered_after_a_forward(tmp_path):
    """On one rank the gathered root is a second copy, cheaper kept than gathered each forward. Across
    2 ranks (the frozen reference reshards after forward, the policy keeps it for the backward) this is
    checked by test_distributed.py's rank-0 loading run, which shards both on 2 ranks already."""
    import subprocess
    import sys

    ranks, frozen, gathered = 1, True, True
    procs = [subprocess.Popen([sys.executable, "-c", _GATHERED_AFTER_FORWARD, str(rank), str(ranks),
                               str(tmp_path / "store"), "frozen" if frozen else "trainable"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(ranks)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outs]
    root = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    assert [out.split() for out, _ in outs] == [root if gathered else []] * ranks


class _HostReads(TorchDispatchMode):
    """Counts the ops that, on a GPU, make the host wait for the device: reading a value (`.item()`,
    `int()`, `bool()`: `_local_scalar_dense`) and sizing a result by its data (`nonzero`, boolean indexing)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "masked_select") or (
                name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_log_probs_add_no_wait_on_the_device_to_the_models_own_forward(kind):
    """A policy forward and backward reads nothing back beyond what the bare transformers forward does
    (it looks at the padding mask to pick an attention kernel): on a GPU each read stalls the host
    mid-step and leaves the device idle while the host queues the rest. The scored positions come
    counted from the host (device_batch). Checked on CPU through the dispatcher, which sees the same ops."""
    model, batch = _tiny_causal_lm(kind), _padded_pairs()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with _HostReads() as bare:
        model(**inputs)
    with _HostReads() as ours:
        chosen, rejected = logps.concatenated_logps(model, batch, average=True)
        (chosen.sum() - rejected.sum()).backward()
    assert ours.seen == bare.seen, (ours.seen, bare.seen)
    with _HostReads() as masked:  # the check can fail: a boolean index counts
        model(**inputs).logits[batch["loss_mask"]]
    assert masked.seen == [*bare.seen, "index"], masked.seen
