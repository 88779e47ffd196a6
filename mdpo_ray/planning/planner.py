"""Will a run fit? Per-rank peak memory of a config, from the model's config alone: no weights.

shape.py counts the parameters on a meta-device build, footprint.py turns the counts and the run's
settings into bytes per row; this module picks the settings from a RunConfig, adds the overhead,
gives the verdict, and searches for the cheapest change that fits. A 70B config plans in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from mdpo_ray.config import BUILTIN, ConfigError, RunConfig, set_dotted
from mdpo_ray.planning.footprint import GIB, ModelShape, Row, StepSettings, fmt_count, peak, rows
from mdpo_ray.planning.shape import model_shape

DEFAULT_GPU_MEMORY_GIB = 80.0
DEFAULT_COMPLETION_FRACTION = 0.5  # share of each sequence's tokens that are completion (scored) tokens
# Beyond the tensors: on a GPU the CUDA context, NCCL and cuBLAS workspaces (fixed) and the caching
# allocator's rounding and fragmentation (a share); on CPU the interpreter and its libraries, and the
# freed memory glibc keeps (the setting CPU workers get; benchmarks/memory.py's peak RSS column).
GPU_OVERHEAD_GIB, GPU_OVERHEAD_SHARE = 1.0, 0.10
CPU_OVERHEAD_GIB, CPU_OVERHEAD_SHARE = 0.75, 0.25
LORA_RANK = 16  # the adapter rank a suggestion tries


@dataclass(frozen=True)
class Plan:
    config: RunConfig  # as planned: scaling.num_workers is the number of ranks
    shape: ModelShape
    settings: StepSettings
    rows: list[Row]
    tensor_bytes: float
    moment: str  # when the peak happens: footprint.STEP, UPDATE or EVAL
    gpu_memory_gib: float | None  # None: a CPU run, nothing to fit into

    @property
    def overhead_bytes(self) -> float:
        fixed, share = ((GPU_OVERHEAD_GIB, GPU_OVERHEAD_SHARE) if self.settings.on_gpu
                        else (CPU_OVERHEAD_GIB, CPU_OVERHEAD_SHARE))
        return fixed * GIB + share * self.tensor_bytes

    @property
    def total_bytes(self) -> float:
        return self.tensor_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.gpu_memory_gib is None or self.total_bytes <= self.gpu_memory_gib * GIB


def plan(cfg: RunConfig, *, gpus: int | None = None, gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
         completion_fraction: float = DEFAULT_COMPLETION_FRACTION) -> Plan:
    """Per-rank peak of `cfg` on `gpus` ranks (default scaling.num_workers). Raises ConfigError."""
    if not 0 < completion_fraction <= 1:
        raise ConfigError(f"completion fraction must be in (0, 1], got {completion_fraction}")
    if gpus is not None and gpus != cfg.scaling.num_workers:
        cfg = _with(cfg, {"scaling.num_workers": gpus}, f"--gpus {gpus}")
    shape = model_shape(cfg)
    settings = step_settings(cfg, completion_fraction)
    table = rows(shape, settings)
    tensor_bytes, moment = peak(table)
    return Plan(cfg, shape, settings, table, tensor_bytes, moment,
                gpu_memory_gib if cfg.scaling.use_gpu else None)


def suggest(p: Plan) -> list[tuple[dict[str, object], Plan]]:
    """Changes that make a plan that does not fit fit, each with its plan.

    The first is the cheapest, trying in order (each keeping the ones before): a smaller micro-batch
    (more accumulation), selective then full activation checkpointing, LoRA, CPU offload; the largest
    micro-batch that fits wins at each stage. When that needs LoRA or offload (or nothing fits), the
    second keeps the run's method: the fewest GPUs (the current count doubled, and again) that fit with
    checkpointing.
    """
    if p.fits:
        return []
    cfg, found = p.config, []
    stages, changes = [{}], {}
    checkpointing = cfg.scaling.activation_checkpointing
    for key, value, already in (("scaling.activation_checkpointing", "selective", bool(checkpointing)),
                                ("scaling.activation_checkpointing", True, checkpointing is True),
                                ("model.lora.r", LORA_RANK, cfg.model.lora.r > 0),
                                ("scaling.cpu_offload", True, cfg.scaling.cpu_offload)):
        if not already:
            changes = changes | {key: value}
            stages.append(changes)
    for stage in stages:
        found = _first_fit(p, stage, cfg.scaling.num_workers)
        if found:
            break
    if found and not ({"model.lora.r", "scaling.cpu_offload"} & set(found[0][0])):
        return found
    gpus = cfg.scaling.num_workers * 2
    while cfg.optim.batch_size % gpus == 0:
        more = _first_fit(p, {"scaling.activation_checkpointing": True}, gpus)
        if more:
            return found + more
        gpus *= 2
    return found


def _first_fit(p: Plan, changes: dict[str, object], gpus: int) -> list[tuple[dict[str, object], Plan]]:
    """The largest micro-batch (or token budget, optim.micro_batch_tokens, halved down to the longest pair) that
    fits with `changes` on `gpus` ranks, as [(changes, plan)], or []."""
    cfg, budget = p.config, p.config.optim.micro_batch_tokens
    per_worker, regrouped = cfg.optim.batch_size // gpus, gpus != cfg.scaling.num_workers
    if budget:
        key, now, floor = "optim.micro_batch_tokens", budget, 2 * cfg.data.max_length
        sizes = sorted({max(floor, budget >> k) for k in range(budget.bit_length())}, reverse=True)
    else:
        key, now = "optim.micro_batch_size", cfg.micro_batch_size
        sizes = [m for m in range(min(per_worker if regrouped else now, per_worker), 0, -1) if per_worker % m == 0]
    for size in sizes:
        change = {"scaling.num_workers": gpus, **changes} if regrouped else dict(changes)
        if size != now or (regrouped and not budget):  # another worker count needs its own micro-batch size
            change[key] = size
        if not change:
            continue
        # Accumulating across ranks, each rank holds a whole fp32 gradient between micro-batches unless it
        # reduce-scatters after each one: try without, then with, the extra traffic.
        accumulates = per_worker > 1 if budget else size < per_worker
        syncs = [False, True] if accumulates and gpus > 1 and not cfg.optim.sync_every_micro_batch else [False]
        for sync in syncs:
            tried = change | ({"optim.sync_every_micro_batch": True} if sync else {})
            candidate = plan(_with(p.config, tried, "suggestion"), gpu_memory_gib=p.gpu_memory_gib or 0,
                             completion_fraction=p.settings.completion_fraction)
            if candidate.fits:
                return [(tried, candidate)]
    return []


def report(p: Plan) -> str:
    """The per-rank table, the verdict, and what to change when it does not fit (mdpo-ray plan)."""
    m, s, cfg = p.shape, p.settings, p.config
    lora = f"; LoRA r={m.lora_rank}: {fmt_count(m.trainable)} trainable" if m.lora_rank else ""
    model = (f"model {cfg.model.name_or_path}: {fmt_count(m.params)} params, {m.blocks} blocks of "
             f"{fmt_count(m.block_params)}, root {fmt_count(m.root_params)}{lora}")
    run = (f"{s.ranks} {'GPU' if s.on_gpu else 'CPU worker'}{'s' if s.ranks > 1 else ''}, "
           f"{'bf16' if s.compute_bytes == 2 else 'fp32'} compute, {_forwards(s)}, "
           f"checkpointing {({True: 'on', False: 'off'}).get(s.checkpointing, s.checkpointing)}, "
           f"cpu offload {'on' if s.offload else 'off'}, reference {s.reference}; completion tokens "
           f"{s.completion_fraction:.0%} of each sequence (--completion-fraction)")
    lines = [model, run, "", f"{'per rank':<38} {'GiB':>8}  {'when':<8} note"]
    for row in p.rows:
        value = f"{row.bytes / GIB:.2f}" if row.counted else f"({row.bytes / GIB:.2f})"
        note = row.note if row.counted else f"{row.why_not}: {row.note}"
        lines.append(f"{row.name:<38} {value:>8}  {row.when:<8} {note}")
    fixed, share = ((GPU_OVERHEAD_GIB, GPU_OVERHEAD_SHARE) if s.on_gpu else (CPU_OVERHEAD_GIB, CPU_OVERHEAD_SHARE))
    what = "CUDA context, NCCL, cuBLAS + allocator fragmentation" if s.on_gpu else "interpreter, libraries, allocator"
    lines += [f"{'tensors at the peak (' + p.moment + ')':<38} {p.tensor_bytes / GIB:>8.2f}",
              f"{'overhead':<38} {p.overhead_bytes / GIB:>8.2f}  {'':<8} {fixed:g} GiB + {share:.0%} ({what})",
              f"{'total':<38} {p.total_bytes / GIB:>8.2f}", "", one_line(p)]
    return "\n".join(lines)


def _forwards(s: StepSettings) -> str:
    if s.budget:
        return (f"forwards of at most {s.budget} tokens (optim.micro_batch_tokens), up to {s.accumulation} a step, "
                f"sequences of up to {s.seq} tokens (data.max_length)")
    return (f"micro-batch {s.micro_batch} pairs ({2 * s.micro_batch} sequences) x {s.seq} tokens (data.max_length; "
            f"every sequence counted at full length), accumulation {s.accumulation}")


def one_line(p: Plan) -> str:
    """The verdict in one line: what train and sweep print before Ray starts."""
    if p.gpu_memory_gib is None:
        forwards = (f"forwards of at most {p.settings.budget} tokens" if p.settings.budget else
                    f"every sequence at data.max_length={p.settings.seq}")
        return f"plan: CPU run, peak ~{p.total_bytes / GIB:.1f} GiB per worker ({p.settings.ranks} workers; {forwards})"
    head = f"~{p.total_bytes / GIB:.1f} GiB of a {p.gpu_memory_gib:g} GiB GPU, on each of {p.settings.ranks}"
    if p.fits:
        return f"plan: fits, {head}"
    options = [f"{_overrides(change)} (~{q.total_bytes / GIB:.1f} GiB)" for change, q in suggest(p)]
    return f"plan: does not fit, {head}; " + ("; or ".join(options) if options else
                                              "nothing tried fits: shorter data.max_length or larger GPUs")


def _overrides(change: dict[str, object]) -> str:
    gpus = change.get("scaling.num_workers")
    keys = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items()
                    if k != "scaling.num_workers")
    return f"{gpus} GPUs with {keys}" if gpus else keys


def step_settings(cfg: RunConfig, completion_fraction: float) -> StepSettings:
    has_eval = cfg.data.eval is not None or cfg.data.eval_fraction > 0 or cfg.data.train == BUILTIN
    # mixed_precision=auto is bf16 on a GPU with native bf16 (Ampere and later; distributed.mixed_precision).
    bf16 = cfg.scaling.use_gpu and cfg.scaling.mixed_precision in ("auto", "bf16")
    return StepSettings(
        ranks=cfg.scaling.num_workers, on_gpu=cfg.scaling.use_gpu, compute_bytes=2 if bf16 else 4,
        micro_batch=cfg.micro_batch_size, seq=cfg.data.max_length, budget=cfg.optim.micro_batch_tokens,
        completion_fraction=completion_fraction,
        accumulation=cfg.accumulation_steps, sync_every_micro_batch=cfg.optim.sync_every_micro_batch,
        checkpointing=cfg.scaling.activation_checkpointing,
        offload=cfg.scaling.cpu_offload,
        reference="adapters" if cfg.model.lora.r and cfg.reference == "resident" else cfg.reference,
        eval_batch=cfg.eval.batch_size if has_eval else None)


def preflight(cfg: RunConfig, label: str = "plan") -> str:
    """The one-line verdict train and sweep print before Ray starts. Never raises: it is advice, and a
    run must not fail on it (a hub id offline, an architecture the planner cannot build on meta)."""
    try:
        p = plan(cfg)
    except Exception as exc:  # noqa: BLE001 (whatever it is, the run goes on without a plan)
        return f"{label}: skipped ({_reason(exc)})"
    line = label + one_line(p).removeprefix("plan")
    if p.gpu_memory_gib is not None:  # the driver does not touch a GPU to find its size (a CUDA context costs one)
        line += f" ({p.gpu_memory_gib:g} GiB assumed; mdpo-ray plan --gpu-memory-gib G shows the table)"
    return line if p.fits else f"WARNING {line}; running anyway"


def _with(cfg: RunConfig, changes: dict[str, object], source: str) -> RunConfig:
    """`cfg` with dotted keys changed, validated again (model_copy would skip the cross-field checks)."""
    raw = cfg.model_dump(mode="json")
    for dotted, value in changes.items():
        set_dotted(raw, dotted, value)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return exc.errors()[0]["msg"].removeprefix("Value error, ")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
