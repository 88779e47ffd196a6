"""Per-rank bytes of a training step, from the model's shape and the run's settings: arithmetic only.

The model follows what the step's code keeps alive, not a generic rule of thumb:
- FSDP2 shards every decoder block and the root (embeddings, final norm, head) over the ranks
  (distributed.shard_model): fp32 master weights, fp32 gradients and AdamW's two fp32 states are
  sharded; a block's parameters are gathered in the compute dtype for its forward and backward (one in
  use and one prefetched), the root's stay gathered from the forward to the end of the backward.
- A resident reference is a second sharded copy in the compute dtype (reference._in_compute_dtype);
  on one rank its root stays gathered, since a frozen root reshards only across ranks.
- Saved activations of a Llama-style block (RMSNorm, rotary attention through SDPA, SwiGLU MLP) are
  counted tensor by tensor in `layer_saved_per_token`; a batch always holds padding (chosen and rejected
  differ in length), so SDPA gets a mask: key/value heads are repeated to all query heads and each
  layer turns the boolean mask into an additive one in the compute dtype.
- The LM head sees only completion positions (logps.py): its logits in the compute dtype are kept for
  backward, the log-softmax runs in fp32 chunks of logps.CHUNK_FLOATS.

Each row is alive at one of three moments (or always): the forward and backward of a micro-batch,
the end of the backward and the optimizer step, an eval forward; the peak is the largest moment. Within
the forward and backward, `rows` counts only the rows of its largest instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CHUNK_FLOATS = 2**24  # logps.CHUNK_FLOATS (a test pins them equal; importing it would load torch for the CLI)
GIB = 2**30
ALWAYS, STEP, UPDATE, EVAL = "always", "fwd+bwd", "update", "eval"  # when a row's bytes are alive
FP32 = 4
# Backward of one block beyond its saved activations: the gradients flowing through it, per token
# (calibrated on CPU against benchmarks/memory.py: the MLP's backward frees its inputs as it goes).
BACKWARD_HIDDEN, BACKWARD_INTERMEDIATE = 2, 1
# A no-grad forward of one block (eval, the reference) holds the residual, the norm's fp32 copy and
# the MLP's branches at once.
NOGRAD_HIDDEN, NOGRAD_INTERMEDIATE = 3, 3


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a causal LM (planner.model_shape reads it)."""

    params: int  # every parameter once (a tied head is the embedding)
    root_params: int  # outside the decoder blocks: embeddings, final norm, head (FSDP2's root unit)
    block_params: int  # the largest decoder block
    blocks: int
    trainable: int  # = params for full fine-tuning; the adapters with LoRA
    trainable_block: int  # trainable parameters of the largest block
    head_trainable: int  # trainable elements of the output embedding (its grad waits for the root's reduce)
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    vocab: int
    kv_heads: int  # grouped-query attention: fewer key/value heads than query heads
    eager_attention: bool  # attn_implementation="eager" keeps the (T, T) attention probabilities
    adapters_per_block: int = 0  # LoRA: adapted linears per block
    lora_rank: int = 0
    # With LoRA a frozen linear keeps no input for its weight's gradient; its adapter keeps it.
    keeps_attention_input: bool = True  # q/k/v projections' input (the first norm's output)
    keeps_mlp_input: bool = True  # gate/up projections' input (the second norm's output)
    keeps_down_input: bool = True  # the down projection's input (act(gate) * up)

    @property
    def full_finetune(self) -> bool:
        return self.lora_rank == 0


@dataclass(frozen=True)
class StepSettings:
    ranks: int
    on_gpu: bool
    compute_bytes: int  # 2: bf16 params and activations; 4: fp32
    micro_batch: int  # pairs per forward per rank: 2x as many sequences
    seq: int  # data.max_length: every sequence is counted at full length
    budget: int | None  # optim.micro_batch_tokens: a forward's tokens, at most; None: micro_batch x 2 x seq
    completion_fraction: float  # share of the tokens whose log-prob is scored (the LM head's rows)
    accumulation: int  # micro-batches per optimizer step
    sync_every_micro_batch: bool  # optim.sync_every_micro_batch: gradients reduce-scattered after each micro-batch
    checkpointing: bool | str  # scaling.activation_checkpointing: False, True (full) or "selective"
    offload: bool  # params, grads and AdamW state in host memory
    reference: str  # "resident", "precompute" or "adapters" (LoRA: the policy with adapters off)
    eval_batch: int | None  # pairs per eval forward; None: no pair eval


@dataclass(frozen=True)
class Row:
    name: str
    bytes: float
    when: str  # ALWAYS, STEP, UPDATE or EVAL
    note: str = ""
    counted: bool = True  # False: shown for comparison, not in the total
    why_not: str = "not at the peak"  # said of a row that is not counted


def layer_saved_per_token(m: ModelShape, d: int, seq: int) -> float:
    """Bytes one decoder block keeps for its backward, per token (no checkpointing).

    Each RMSNorm keeps its input in fp32 (a copy under bf16) and, when its weight trains, the normalized
    input; each linear whose weight (or adapter) trains keeps its input; SDPA keeps q, k, v, its output
    and a logsumexp per head; SiLU keeps the gate, the product keeps both factors.
    """
    q_width = m.heads * m.head_dim
    saved = 2 * FP32 * m.hidden  # both norms' fp32 inputs
    if m.full_finetune:
        saved += 2 * d * m.hidden  # both norms' normalized inputs, for their weights' gradients
    saved += d * m.hidden * (m.keeps_attention_input + m.keeps_mlp_input)
    saved += d * q_width * 4  # q (rotated), k and v repeated to every head (a mask is given), SDPA's output
    if m.eager_attention:
        saved += m.heads * seq * (FP32 + d)  # softmax in fp32 and its copy in the compute dtype
    else:
        saved += FP32 * m.heads + d * seq  # logsumexp per head; the additive mask SDPA made from the boolean one
    saved += d * m.intermediate * (3 + m.keeps_down_input)  # gate, act(gate), up (+ their product)
    saved += d * m.lora_rank * m.adapters_per_block  # each adapter's rank-r middle
    return saved


def layer_kept_selective(m: ModelShape, d: int) -> float:
    """Bytes one decoder block keeps per token under selective checkpointing (distributed.checkpoint_blocks):
    its input, and what its matmuls and attention kernel return: q, k and v as projected, the attention
    output and its logsumexp per head, the output projection's, the gate's, the up projection's and the
    down projection's outputs; with LoRA each adapter's rank-r middle and its output (counted at the
    hidden width)."""
    q_width, kv_width = m.heads * m.head_dim, m.kv_heads * m.head_dim
    kept = d * (m.hidden + 2 * q_width + 2 * kv_width) + FP32 * m.heads + d * m.hidden * 2 + d * m.intermediate * 2
    return kept + d * m.adapters_per_block * (m.lora_rank + m.hidden)


def rows(m: ModelShape, s: StepSettings) -> list[Row]:
    """Every row of the per-rank table. Within a step, three moments compete (the largest counts): the
    reference's forward, with the policy's logits kept; the head's backward, their gradient beside them;
    and a block's backward, after the logits are freed."""
    d, g = s.compute_bytes, s.ranks
    tokens = min(s.budget or math.inf, 2 * s.micro_batch * s.seq)  # chosen and rejected in one forward
    out = _sharded_rows(m, s) + _reference_rows(m, s)
    out.append(Row("parameters, gathered root", d * m.root_params, STEP,
                   f"{fmt_count(m.root_params)} in {_dtype(d)}, kept from the forward to the end of the backward"))

    per_layer = layer_saved_per_token(m, d, s.seq)
    kept = {False: per_layer, True: m.hidden * d, "selective": layer_kept_selective(m, d)}  # per token and block
    saved_per_block = kept[s.checkpointing]
    around = tokens * (FP32 * m.hidden + (d * m.hidden if m.full_finetune else 0) + 8 + s.seq)  # final norm, ids, mask
    for checkpointing, per_block in kept.items():
        name = {False: "no checkpointing", True: "checkpointing", "selective": "selective checkpointing"}[checkpointing]
        out.append(Row(f"activations, {name}", tokens * m.blocks * per_block + around, STEP,
                       f"{m.blocks} blocks x {fmt_count(per_block)} B/token x {tokens} tokens",
                       counted=checkpointing == s.checkpointing, why_not="not configured"))

    scored = s.completion_fraction * tokens
    logits_kept = scored * (d * (m.hidden + m.vocab) + 2 * FP32)  # the head's input, its logits, logsumexp
    logits_grad = scored * d * m.vocab + _chunks_alive(scored, m.vocab)
    reference = 0.0 if s.reference == "precompute" else _nograd_forward(m, s, tokens, scored)
    block = d * (2 * m.block_params + m.head_trainable)  # this block and the next (prefetched); the head's grad
    block += (d + (FP32 if d != FP32 else 0)) * m.trainable_block  # this block's grads, unsharded, to reduce
    block += tokens * d * (BACKWARD_HIDDEN * m.hidden + BACKWARD_INTERMEDIATE * m.intermediate)
    if s.checkpointing:
        block += tokens * per_layer  # its activations, recomputed
    if s.accumulation == 1:  # at the first block the others' grads are in, their activations gone
        block += max(0.0, FP32 * (m.blocks - 1) * m.trainable_block / g - tokens * (m.blocks - 1) * saved_per_block)
    at_logits = logits_kept + max(reference, logits_grad)
    out += [Row("logits, kept for backward", logits_kept, STEP, f"{scored:.0f} completion rows x vocab {m.vocab}",
                counted=at_logits >= block),
            Row("reference forward (transient)", reference, STEP, "gathered block(s) (and root) + one block's "
                "forward, or its logits", counted=at_logits >= block and reference >= logits_grad),
            Row("logits' gradient + fp32 chunks", logits_grad, STEP, "the head's backward",
                counted=at_logits >= block and logits_grad > reference),
            Row("backward of one block", block, STEP, "2 gathered blocks, their grads, activation grads"
                + (", recomputed activations" if s.checkpointing else ""), counted=block > at_logits)]

    # At the embedding's backward, the last moment before the root's reduce-scatter: the root's gathered
    # params and unsharded grads (plus their fp32 copy to reduce), the first block's grads still to reduce;
    # the root's sharded grads (in the gradients row) do not exist yet.
    root_trainable = m.trainable - m.blocks * m.trainable_block
    end_of_backward = d * m.root_params + (d + (FP32 if d != FP32 else 0)) * (root_trainable + m.trainable_block)
    end_of_backward -= 0 if s.offload else FP32 * root_trainable / g
    # The loop's AdamW is fused (mdpo_ray.training.train_loop): it updates the shards in place, no temporary copy
    # of its state (foreach AdamW's, an fp32 copy on a GPU, was counted here before).
    out.append(Row("end of backward", end_of_backward, UPDATE, "the root's gathered params and unsharded grads; "
                   "fused AdamW then updates in place"))
    if s.eval_batch:
        eval_tokens = 2 * s.eval_batch * s.seq
        out.append(Row("eval forward, no grad", d * m.root_params + _nograd_forward(  # + the policy's root
            m, s, eval_tokens, s.completion_fraction * eval_tokens), EVAL,
            f"eval.batch_size={s.eval_batch} pairs: gathered root and blocks, one block's forward or the logits"))
    return out


def _nograd_forward(m: ModelShape, s: StepSettings, tokens: float, scored: float) -> float:
    """A forward without grad (the reference, eval): the gathered block(s), then the larger of one block's
    transient tensors (the MLP's branches beside the residual) and the head's logits with their chunks.
    A GPU gathers the next block while it computes this one; a CPU rank runs them one after the other.
    A resident reference across ranks gathers its root for the forward (on one rank it stays gathered)."""
    d = s.compute_bytes
    layer = tokens * d * (NOGRAD_HIDDEN * m.hidden + NOGRAD_INTERMEDIATE * m.intermediate)
    head = scored * d * m.vocab + _chunks_alive(scored, m.vocab)
    root = d * m.root_params if s.reference == "resident" and s.ranks > 1 else 0
    return root + (2 if s.on_gpu else 1) * d * m.block_params + max(layer, head)


def _sharded_rows(m: ModelShape, s: StepSettings) -> list[Row]:
    """FSDP2's shards of the policy; with CPU offload they live in host memory and cost the GPU nothing."""
    g = s.ranks
    # Accumulating without a reduce-scatter per micro-batch, FSDP2 sums each rank's whole gradient
    # unsharded, in fp32 (the reduce dtype), until the last micro-batch (distributed.sync_gradients).
    unsharded = s.accumulation > 1 and not s.sync_every_micro_batch and g > 1
    parts = (("parameters, fp32 shards", FP32 * m.params / g, (ALWAYS,), f"{fmt_count(m.params)} params / {g}"),
             ("gradients, fp32 shards", FP32 * m.trainable / g,
              (STEP, UPDATE) if s.accumulation > 1 and not unsharded else (UPDATE,),  # accumulated across micro-batches
              f"{fmt_count(m.trainable)} trainable / {g}"),
             ("AdamW state, fp32 shards", 2 * FP32 * m.trainable / g, (ALWAYS,), "exp_avg + exp_avg_sq"))
    out = []
    for name, value, whens, note in parts:
        for when in whens:
            out.append(Row(name, 0.0, when, f"{_gib(value)} GiB in host memory") if s.offload
                       else Row(name, value, when, note))
    if unsharded:  # on the device, offload or not: FSDP2 offloads only the reduced shards
        out.append(Row("gradients, unsharded fp32, accumulating", FP32 * m.trainable, STEP,
                       f"{fmt_count(m.trainable)} trainable, whole on each rank between micro-batches "
                       "(optim.sync_every_micro_batch=false)"))
    return out


def _reference_rows(m: ModelShape, s: StepSettings) -> list[Row]:
    d, g = s.compute_bytes, s.ranks
    if s.reference == "precompute":
        return [Row("reference", 0.0, ALWAYS, "precomputed: an (N, 2) fp32 table, 8 B a pair")]
    if s.reference == "adapters":
        return [Row("reference", 0.0, ALWAYS, "the policy with its adapters off: no second copy")]
    stored = Row("reference, shards", d * m.params / g, ALWAYS, f"frozen copy in {_dtype(d)}")
    if g == 1:  # a frozen root reshards after forward only across ranks (distributed._reshard_root)
        return [stored, Row("reference, gathered root", d * m.root_params, ALWAYS, "stays gathered on one rank")]
    return [stored]


def peak(table: list[Row]) -> tuple[float, str]:
    """(bytes, moment) of the largest moment: the rows alive always, plus the biggest of the others."""
    always = sum(r.bytes for r in table if r.counted and r.when == ALWAYS)
    moments = {when: sum(r.bytes for r in table if r.counted and r.when == when) for when in (STEP, UPDATE, EVAL)}
    moment = max(moments, key=moments.get)
    return always + moments[moment], moment


def _chunks_alive(rows: float, vocab: int) -> float:
    """fp32 log-softmax chunks (logps._PickedLogps) alive at once: exp(x - lse) and its input, plus the
    previous chunk, still bound to its name while the next is computed, once there is more than one."""
    per_chunk = max(1, CHUNK_FLOATS // vocab)
    return FP32 * vocab * min(rows, per_chunk) * (3 if rows > per_chunk else 2)


def fmt_count(n: float) -> str:
    """12345678 -> "12.3M"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _dtype(d: int) -> str:
    return "bf16" if d == 2 else "fp32"
