"""Padding-free (packed) batches and length-grouped micro-batches, against the padded path they replace."""

import pytest
import torch

from mdpo_ray.config import ConfigError, load_config
from mdpo_ray.data.pairs import collate_pairs, real_tokens
from mdpo_ray.training import attention, logps
from mdpo_ray.training.schedule import batch_indices, micro_batches, token_micro_batches

# (prompt, chosen, rejected) tokens of 4 pairs: 1 to 131 tokens a sequence, a 100x spread within a batch.
SPANS = [(2, 90, 3), (60, 1, 40), (5, 7, 126), (1, 2, 2)]


def _rows(spans=SPANS, vocab=61, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, vocab, (n,), generator=gen).tolist()
    return [{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)} for p, c, r in spans]


def _tiny_causal_lm(kind: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    if kind == "gemma2":  # logit soft-capping, and a sliding-window layer beside a global one
        return Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=8, final_logit_softcapping=0.5, sliding_window=32))
    if kind == "llama_by_sequence":  # what a packed run makes of an sdpa model (training.attention)
        model = _tiny_causal_lm("llama_sdpa")
        assert attention.use_for_packing(model)
        return model
    return LlamaForCausalLM(LlamaConfig(**shape, attn_implementation=kind.removeprefix("llama_")))


class Opaque(torch.nn.Module):
    """A model whose head cannot be found (no get_output_embeddings) and that drops `drop` from its inputs."""

    def __init__(self, inner, drop=()):
        super().__init__()
        self.inner, self.drop, self.config = inner, drop, inner.config

    def forward(self, **kwargs):
        return self.inner(**{k: v for k, v in kwargs.items() if k not in self.drop})


def _both(rows, one_row=False):
    cpu = torch.device("cpu")
    return (logps.device_batch(collate_pairs(rows, 0), cpu),
            logps.device_batch(collate_pairs(rows, 0, padding_free=True, one_row=one_row), cpu))


def test_packing_lays_every_sequence_out_once_with_its_own_positions_in_rows_no_wider_than_padded():
    padded, packed = _both(_rows())
    lengths = padded["attention_mask"].sum(1)
    assert packed["input_ids"].shape[1] <= padded["input_ids"].shape[1]
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # 4 rows for 8 sequences here
    assert "attention_mask" not in packed  # with one, transformers would not look for the position resets
    assert real_tokens(packed) == real_tokens(padded) == int(lengths.sum())
    starts = (packed["position_ids"].flatten() == 0).nonzero().squeeze(1).tolist()
    found = []
    for start in starts:  # every segment is a whole sequence (or a row's padded tail), positions 0, 1, ...
        ids, end = packed["input_ids"].flatten(), start + 1
        while end < ids.numel() and packed["position_ids"].flatten()[end] != 0:
            end += 1
        matches = [i for i in range(8) if lengths[i] == end - start and
                   torch.equal(padded["input_ids"][i, : end - start], ids[start:end])]
        found += matches[:1]
    assert sorted(found) == list(range(8))
    # The head's rows score the same tokens as the padded batch's, and go back to the same places.
    assert torch.equal(packed["scored_slot"], padded["scored_index"])
    assert torch.equal(packed["input_ids"].flatten()[packed["scored_index"] + 1],
                       padded["input_ids"].flatten()[padded["scored_index"] + 1])


@pytest.mark.parametrize("kind", ["llama_sdpa", "llama_eager", "gemma2", "llama_by_sequence"])
@pytest.mark.parametrize("average", [False, True])
def test_packed_log_probs_and_gradients_equal_the_padded_ones(kind, average):
    """fp32, sequences of 1 to 131 tokens: the same per-pair log-probs to 1e-5 and the same gradient of a
    loss of them, with the LM head seeing only the scored rows either way. Attention by sequence runs the packed
    batch as one row, and the padded one as transformers' sdpa does (its rows are one sequence each)."""
    model = _tiny_causal_lm(kind)
    results = []
    for batch in _both(_rows(), one_row=attention.by_sequence(model)):
        calls = []
        head = model.get_output_embeddings()
        hook = head.register_forward_hook(lambda m, a, out, calls=calls: calls.append(a[0].shape))
        chosen, rejected = logps.concatenated_logps(model, batch, average=average)
        hook.remove()
        assert calls == [(1, batch["scored_index"].numel(), 32)]
        (chosen.sum() - 2 * rejected.sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((torch.cat([chosen, rejected]).detach(), grads))
        model.zero_grad()
    (padded, padded_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    for name, grad in padded_grads.items():  # a weight's gradient sums over the tokens, in another order packed
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()), msg=name)


def test_packed_mean_logits_and_the_full_logits_fallback_equal_the_padded_ones():
    model = _tiny_causal_lm("llama_sdpa")
    padded, packed = _both(_rows())
    with torch.no_grad():
        expected = torch.cat(logps.concatenated_logps(model, padded, mean_logits=True))
        hooked = torch.cat(logps.concatenated_logps(model, packed, mean_logits=True))
        full = torch.cat(logps.concatenated_logps(Opaque(model), packed, mean_logits=True))
    torch.testing.assert_close(hooked, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama_sdpa", "llama_eager", "gemma2"])
def test_the_attention_check_passes_models_that_keep_packed_sequences_apart(kind):
    model = _tiny_causal_lm(kind)
    logps.check_packed_attention(model, torch.device("cpu"))
    assert attention.by_sequence(model) == (kind == "llama_sdpa")  # made ready: sdpa attends by sequence now


def test_one_row_packs_every_sequence_of_a_forward_end_to_end():
    padded, packed = _both(_rows(), one_row=True)
    assert packed["input_ids"].shape == (1, real_tokens(padded))  # no padding at all
    assert (packed["position_ids"] == 0).sum() == 8  # eight sequences, each from position 0
    assert torch.equal(packed["input_ids"].flatten()[packed["scored_index"] + 1],
                       padded["input_ids"].flatten()[padded["scored_index"] + 1])


def test_attention_by_sequence_only_replaces_sdpa_over_full_causal_windows():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    assert attention.use_for_packing(_tiny_causal_lm("llama_sdpa"))
    assert not attention.use_for_packing(_tiny_causal_lm("llama_eager"))
    assert not attention.use_for_packing(_tiny_causal_lm("gemma2"))  # eager, and sliding-window layers
    windowed = MistralForCausalLM(MistralConfig(**shape, sliding_window=16, attn_implementation="sdpa"))
    assert not attention.use_for_packing(windowed) and windowed.config._attn_implementation == "sdpa"
    full = Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=False, attn_implementation="sdpa"))
    assert attention.use_for_packing(full)  # Qwen2 names a window it does not use
    sliding = Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=True, sliding_window=16, max_window_layers=0,
                                           attn_implementation="sdpa"))
    assert not attention.use_for_packing(sliding)


def test_attention_by_sequence_reads_the_sequence_bounds_back_once_a_forward(monkeypatch):
    """On a GPU each read-back waits for the device: the layers of one forward share the bounds of its position_ids
    (and a new forward reads its own)."""
    model = _tiny_causal_lm("llama_by_sequence")
    reads = []
    read = attention._read_starts
    monkeypatch.setattr(attention, "_read_starts", lambda *args: reads.append(1) or read(*args))
    for _ in range(2):  # two batches, as two steps collate them
        _, packed = _both(_rows(), one_row=True)
        logps.concatenated_logps(model, packed)[0].sum().backward()
    assert model.config.num_hidden_layers == 2 and len(reads) == 2  # one a forward, two layers each


def test_a_model_attending_by_sequence_generates_what_sdpa_generates():
    """The evaluation and sampling of a packed run: left-padded prompts of different lengths (their padding a
    sequence of its own to attention by sequence), then cached decoding steps (sdpa with its mask)."""
    model = _tiny_causal_lm("llama_sdpa").eval()
    prompts = torch.tensor([[0, 0, 0, 0, 5, 9, 11], [3, 4, 8, 13, 2, 7, 1]])
    mask = (torch.arange(7) >= torch.tensor([[4], [0]])).long()
    settings = dict(attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True)
    expected = model.generate(prompts, **settings)
    assert attention.use_for_packing(model)
    got = model.generate(prompts, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=0, atol=1e-5)


@pytest.mark.parametrize("drop", [("position_ids",), ("position_ids", "attention_mask")])
def test_a_model_that_lets_packed_sequences_see_each_other_is_refused_with_the_fix(drop):
    model = Opaque(_tiny_causal_lm("llama_sdpa"), drop=drop)
    with pytest.raises(ConfigError, match="does not keep packed sequences apart.*data.padding_free=false"):
        logps.check_packed_attention(model, torch.device("cpu"))
    padded, packed = _both(_rows())  # what the check prevents: log-probs that depend on the neighbours
    with torch.no_grad():
        assert not torch.allclose(torch.cat(logps.concatenated_logps(model, packed)),
                                  torch.cat(logps.concatenated_logps(model, padded)), atol=1e-3)


def test_auto_packs_a_model_that_keeps_sequences_apart_and_pads_one_that_does_not():
    """data.padding_free's default, `auto`, becomes a bool when the run starts: packed where the check
    passes, padded (and said) where it does not; `true` stops such a run, `false` never runs the check."""
    cpu, said = torch.device("cpu"), []
    cfg = load_config(None, [])
    assert cfg.data.padding_free == "auto"
    assert logps.resolve_padding_free(cfg, _tiny_causal_lm("llama_sdpa"), cpu, said.append).data.padding_free is True
    assert said == []
    opaque = Opaque(_tiny_causal_lm("llama_sdpa"), drop=("position_ids",))
    assert logps.resolve_padding_free(cfg, opaque, cpu, said.append).data.padding_free is False
    assert len(said) == 1 and said[0].startswith("data.padding_free=auto: padded batches, since Opaque")
    with pytest.raises(ConfigError, match="does not keep packed sequences apart.*data.padding_free=false"):
        logps.resolve_padding_free(load_config(None, ["data.padding_free=true"]), opaque, cpu, said.append)
    off = load_config(None, ["data.padding_free=false"])
    assert logps.resolve_padding_free(off, opaque, cpu, said.append) is off and len(said) == 1


# ------------------------------------------------------------------------------------- grouped micro-batches


@pytest.mark.parametrize("world", [1, 2])
def test_grouped_micro_batches_hold_the_steps_pairs_sorted_by_length_and_depend_only_on_the_step(world):
    lengths = [int(x) for x in torch.randint(10, 2000, (37,), generator=torch.Generator().manual_seed(0))]
    options = dict(n=37, batch_size=8, micro_batch_size=2, seed=5, world=world)
    for step in range(1, 12):  # three epochs
        grouped = [micro_batches(step, rank=r, lengths=lengths, **options) for r in range(world)]
        plain = [micro_batches(step, rank=r, **options) for r in range(world)]
        assert all(len(mine) == 4 // world and all(len(m) == 2 for m in mine) for mine in grouped)
        step_pairs = sorted(batch_indices(step, n=37, batch_size=8, seed=5, rank=0, world=1))
        assert sorted(i for mine in grouped for m in mine for i in m) == step_pairs
        assert sorted(i for mine in plain for m in mine for i in m) == step_pairs
        # Dealt in turn: accumulation step j of every rank holds the (j * world + rank)-th shortest pairs.
        dealt = [grouped[r][j] for j in range(4 // world) for r in range(world)]
        keys = [lengths[i] for m in dealt for i in m]
        assert keys == sorted(keys)
        assert grouped == [micro_batches(step, rank=r, lengths=lengths, **options) for r in range(world)]


def test_group_by_length_without_micro_batches_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="optim.micro_batch_size"):
        load_config(None, ["data.group_by_length=true", "optim.batch_size=8", "scaling.num_workers=1"])
    load_config(None, ["data.group_by_length=true", "optim.batch_size=8", "scaling.num_workers=1",
                       "optim.micro_batch_size=2"])
    load_config(None, ["data.group_by_length=true", "optim.batch_size=8", "scaling.num_workers=2"])


# ------------------------------------------------------------------------------------- token-budget forwards


def _sizes(n=37, seed=0):
    """(both sequences, the longer one) of n pairs with a long tail: 20 to 1,800 tokens a sequence."""
    gen = torch.Generator().manual_seed(seed)
    prompt, chosen, rejected = (torch.randint(10, 900, (n,), generator=gen).tolist() for _ in range(3))
    return [(2 * p + c + r, p + max(c, r)) for p, c, r in zip(prompt, chosen, rejected, strict=True)]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_token_budget_forwards_hold_the_ranks_pairs_in_order_within_the_budget_and_as_many_on_every_rank(world, packed):
    sizes, budget = _sizes(), 5000  # the longest pair costs at most 2 x 1,800 tokens, padded or packed
    cost = (lambda m: sum(sizes[i][0] for i in m)) if packed else (lambda m: 2 * len(m) * max(sizes[i][1] for i in m))
    options = dict(n=37, batch_size=16, seed=5, world=world, sizes=sizes, budget=budget, packed=packed)
    counts = set()
    for step in range(1, 10):  # four epochs
        forwards = [token_micro_batches(step, rank=r, **options) for r in range(world)]
        for r, mine in enumerate(forwards):
            assert [i for m in mine for i in m] == batch_indices(step, n=37, batch_size=16, seed=5, rank=r, world=world)
            assert all(m and cost(m) <= budget for m in mine)
        assert len({len(mine) for mine in forwards}) == 1  # FSDP's collectives: as many forwards on every rank
        counts.add(len(forwards[0]))
        assert forwards == [token_micro_batches(step, rank=r, **options) for r in range(world)]
    assert len(counts) > 1  # the lengths vary, so does the number of forwards: the test sees both cases


def test_a_rank_that_needs_fewer_forwards_splits_its_costliest_one():
    # Rank 0 holds four short pairs (one forward), rank 1 a long one and three short ones (two forwards).
    sizes = [(100, 60)] * 3 + [(3000, 1600)] + [(100, 60)] * 4
    order = batch_indices(1, n=8, batch_size=8, seed=0, rank=0, world=1)
    by_rank = {r: order[4 * r: 4 * r + 4] for r in range(2)}
    long_rank = next(r for r, pairs in by_rank.items() if 3 in pairs)
    forwards = [token_micro_batches(1, n=8, batch_size=8, seed=0, rank=r, world=2, sizes=sizes, budget=3200,
                                    packed=True) for r in range(2)]
    assert len(forwards[long_rank]) == 2
    assert [len(m) for m in forwards[1 - long_rank]] == [2, 2]  # split at its middle, the halves' costs equal


def test_a_token_budget_is_refused_with_the_fix_when_it_cannot_hold_a_pair_or_meets_another_cut():
    base = ["optim.batch_size=8", "scaling.num_workers=1", "data.max_length=512"]
    with pytest.raises(ValueError, match=r"micro_batch_tokens \(1000\) must hold the longest pair.*1024"):
        load_config(None, [*base, "optim.micro_batch_tokens=1000"])
    with pytest.raises(ValueError, match="set one of them"):
        load_config(None, [*base, "optim.micro_batch_tokens=4096", "optim.micro_batch_size=2"])
    with pytest.raises(ValueError, match="data.group_by_length=false"):
        load_config(None, [*base, "optim.micro_batch_tokens=4096", "data.group_by_length=true"])
    cfg = load_config(None, [*base, "optim.micro_batch_tokens=1024"])
    assert cfg.accumulation_steps == 8  # at most one forward a pair
