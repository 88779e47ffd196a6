"""Log-prob masking and the chunked fp32 log-softmax, against a direct computation."""

import torch

from mdpo_ray import logps


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


def test_bf16_logits_are_reduced_in_fp32():
    torch.manual_seed(3)
    logits = torch.randn(2, 8, 50) * 5
    input_ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    out = logps.sequence_logps(logits.bfloat16(), input_ids, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _direct(logits.bfloat16().float(), input_ids, mask), rtol=1e-4, atol=1e-3)
