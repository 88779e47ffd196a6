"""The per-worker preference-training loop. It never imports Ray: the launcher hands it a `Worker`.

Read top to bottom: data, models, reference, optimizer, restore, then per step forward, loss,
backward, clip, step, reduce, log, report, checkpoint; then export. (nanoGPT `train.py`.)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mdpo_ray import storage
from mdpo_ray.config import RunConfig
from mdpo_ray.data.pairs import collate_pairs, load_train_eval, pair_sizes, real_tokens
from mdpo_ray.tracking.mlflow_runs import EXPORT_PATH_TAG, EXPORT_URI_TAG, STOP_REASON_TAG, WORKER_NODES_TAG
from mdpo_ray.tracking.sinks import MetricSink, NullSink
from mdpo_ray.training import distributed, evaluate, lora
from mdpo_ray.training import reference as ref
from mdpo_ray.training.attention import by_sequence
from mdpo_ray.training.logps import chosen_token_mean_nll, concatenated_logps, device_batch, resolve_padding_free
from mdpo_ray.training.losses import LOSSES, with_chosen_nll
from mdpo_ray.training.metrics import EVAL_PREFIX, EVAL_START_PREFIX, data_tags, pair_metrics
from mdpo_ray.training.model import export_pretrained, load_causal_lm, load_tokenizer
from mdpo_ray.training.model_card import RunFacts, write_model_card
from mdpo_ray.training.schedule import lr_at, micro_batches, token_micro_batches

STATE_FILE = "trainer_state.json"


@dataclass
class Worker:
    """What the launcher tells the loop about its place in the job."""

    gpu: int = 0  # the CUDA device index Ray Train gave this worker; read only with scaling.use_gpu
    report: Callable[[dict[str, float], Path | None, int], None] = lambda metrics, ckpt_dir, step: None
    restore_dir: Path | None = None  # latest checkpoint, when resuming
    sink: MetricSink = field(default_factory=NullSink)  # MLflow on rank 0, NullSink elsewhere
    mlflow_run_id: str | None = None  # for the exported model card; None: not tracked
    node: str = ""  # the Ray node this worker runs on; "" outside Ray


class NonFiniteError(RuntimeError):
    pass


def _setup(cfg: RunConfig, worker: Worker):
    """(say, device, tokenizer, (train_ds, eval_ds, data_stats), mesh, mp_policy): what every entry needs."""
    device = distributed.device_for(worker.gpu, cfg.scaling.use_gpu)
    # Ray Train has made the group on its workers; elsewhere (tests, the benchmark) a one-rank group.
    distributed.ensure_process_group("nccl" if device.type == "cuda" else "gloo")
    if not storage.is_remote(cfg.output_dir):  # before anything is written there; an object store is one for all
        distributed.check_shared_directory(Path(cfg.output_dir), key="output_dir")
    say = print if distributed.rank() == 0 else (lambda *a, **k: None)
    tokenizer = load_tokenizer(cfg.model)
    data = load_train_eval(cfg.data, tokenizer, cfg.seed)
    for stats in data[2]:
        say(stats.summary())
    mesh = distributed.make_mesh(device)
    return say, device, tokenizer, data, mesh, distributed.mixed_precision(cfg.scaling.mixed_precision, device)


def _record_placement(worker: Worker, say) -> None:
    """Which node each rank runs on, tagged and said on every (re)start: after a lost node the restarted
    group may sit elsewhere. Ray's own local_rank/node_rank group workers by IP, which several nodes on
    one machine (or behind one address) share, so the node id is what tells them apart."""
    nodes = distributed.gather_objects(worker.node)
    if not any(nodes):
        return
    ranks: dict[str, list[str]] = {}
    for rank, node in enumerate(nodes):
        ranks.setdefault(node, []).append(str(rank))
    placement = ";".join(f"{node}:{','.join(r)}" for node, r in ranks.items())
    worker.sink.tag(WORKER_NODES_TAG, placement)
    say(f"{len(nodes)} worker(s) on {len(ranks)} node(s): {placement}")


def train(cfg: RunConfig, worker: Worker) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    say, device, tokenizer, (train_ds, eval_ds, data_stats), mesh, mp_policy = _setup(cfg, worker)
    rank, world = distributed.rank(), distributed.world_size()
    _record_placement(worker, say)
    problems = evaluate.load_problems(cfg.data.generation_eval, cfg.eval.max_generation_problems) \
        if cfg.data.generation_eval else []

    policy = load_causal_lm(cfg.model, trainable=True, weights=rank == 0)
    if cfg.model.lora.r:
        policy = lora.wrap(policy, cfg.model.lora)  # before sharding, which gives every rank rank 0's adapters
    policy = distributed.shard_model(policy, mesh, mp_policy, checkpoint=cfg.scaling.activation_checkpointing,
                                     offload=cfg.scaling.cpu_offload)
    if cfg.data.padding_free is not False:  # before the reference: its cache key records the packing
        cfg = resolve_padding_free(cfg, policy, device, say)
        policy.reshard()  # the check's forward left the root gathered; the optimizer must take the shards
    reference, eval_reference, cache_statuses = ref.build(cfg, (train_ds, eval_ds), tokenizer.pad_token_id, mesh,
                                                          mp_policy, device, say, policy=policy)
    if cache_statuses:
        worker.sink.tag("mdpo.reference_cache", ",".join(cache_statuses))  # e.g. "reused,reused" in a sweep trial
    average = cfg.loss.average_log_prob

    trainable = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapters (no state for frozen weights)
    # fused: one kernel a tensor, updating in place, where the default loops over ops on CPU and keeps foreach's fp32
    # copy of the state on a GPU (what the planner no longer counts). On the 2-core benchmark step its profiled share
    # fell from 6% to 1%; unprofiled the step moved within noise (benchmarks/step_bound.py). It rounds ~1e-7 apart.
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay, fused=True)
    state = {"step": 0, "nonfinite_steps": 0, "eval_start": {}}
    if worker.restore_dir is not None:
        distributed.load_sharded(worker.restore_dir, policy, optimizer)
        state = json.loads((worker.restore_dir / STATE_FILE).read_text())
        state.pop("scheduler", None)  # checkpoints written before the schedule was a function of the step
        say(f"resumed from {worker.restore_dir} at step {state['step']}")
        if state["step"] >= cfg.optim.max_steps:
            say(f"run {cfg.name!r} already reached optim.max_steps={cfg.optim.max_steps}: nothing to train "
                "(raise optim.max_steps to continue it, or set a new name for a fresh run)")

    def run_eval(start: bool = False) -> dict[str, float]:
        out = evaluate.eval_pairs(policy, eval_reference, eval_ds, loss_cfg=cfg.loss, eval_cfg=cfg.eval,
                                  pad_token_id=tokenizer.pad_token_id, device=device,
                                  padding_free=cfg.data.padding_free) if eval_ds else {}
        if not problems:
            return out
        # Before training the policy is the loaded model: every run (sweep trial) from it scores the same.
        return out | (evaluate.start_generation(policy, tokenizer, problems, cfg=cfg,
                                                numerics=ref.numerics(device, mp_policy)) if start else
                      evaluate.eval_generation(policy, tokenizer, problems, eval_cfg=cfg.eval))

    if state["step"] == 0:
        state["eval_start"] = run_eval(start=True)
        worker.sink.log(state["eval_start"], step=0)
        for key, value in _data_tags(data_stats).items():
            worker.sink.tag(key, value)
        say("before training: " + _describe(state["eval_start"]))

    loss_fn, knobs = LOSSES[cfg.loss.name], cfg.loss.knobs()
    budget = cfg.optim.micro_batch_tokens
    sizes = pair_sizes(train_ds) if budget or cfg.data.group_by_length else []
    lengths = [longer for _, longer in sizes] if cfg.data.group_by_length else None
    one_row = by_sequence(policy)  # packed forwards of all their sequences in one row (training.attention)
    window: list[torch.Tensor] = []  # per-pair columns since the last log
    step_stats = {"grad_norm": 0.0, "tokens": 0.0, "seconds": 0.0, "steps": 0}
    consecutive_nonfinite, last_metrics, stop_reason = 0, {}, None
    for step in range(state["step"] + 1, cfg.optim.max_steps + 1):
        started = time.perf_counter()
        lr = lr_at(cfg.optim, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if budget:
            micros = token_micro_batches(step, n=len(train_ds), batch_size=cfg.optim.batch_size, seed=cfg.seed,
                                         rank=rank, world=world, sizes=sizes, budget=budget,
                                         packed=cfg.data.padding_free)
        else:
            micros = micro_batches(step, n=len(train_ds), batch_size=cfg.optim.batch_size,
                                   micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, rank=rank, world=world,
                                   lengths=lengths)
        n_pairs = sum(map(len, micros))  # this rank's share of the global batch
        step_loss, columns = torch.zeros((), device=device), []  # columns: per-pair values of each micro-batch
        for micro, micro_indices in enumerate(micros):
            last = micro == len(micros) - 1
            distributed.sync_gradients(policy, last or cfg.optim.sync_every_micro_batch)
            host_batch = collate_pairs(ref.take(train_ds, micro_indices), tokenizer.pad_token_id,
                                       padding_free=cfg.data.padding_free, one_row=one_row)
            batch = device_batch(host_batch, device)
            policy_chosen, policy_rejected, chosen_logits, rejected_logits = concatenated_logps(
                policy, batch, average=average, mean_logits=True)
            ref_chosen, ref_rejected = reference.logps(batch, micro_indices)
            out = with_chosen_nll(loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **knobs),
                                  chosen_token_mean_nll(policy_chosen, batch["loss_mask"], average=average),
                                  nll_weight=cfg.loss.nll_weight)
            # Summed over the micro-batch and divided by the rank's whole slice, the accumulated gradient is
            # that of the rank's mean loss; FSDP2 averages it over ranks: the global batch's mean, whatever
            # the micro-batch size.
            loss = out.losses.sum() / n_pairs
            loss.backward()
            step_loss += loss.detach()
            columns.append(torch.stack([out.losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                        chosen_logits, rejected_logits], 1).detach().float())
            step_stats["tokens"] += real_tokens(host_batch)
        grad_norm = distributed.clip_grad_norm(policy, cfg.optim.grad_clip)
        # All ranks see the same global grad norm and summed loss, so they agree on skipping.
        global_loss = distributed.all_reduce_sum(step_loss.float().reshape(1))
        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(global_loss).all())  # the step's one wait on the device
        # Read out now, while the device is idle: after optimizer.step() these copies would queue behind it
        # and the host could not prepare the next step while the device runs the update.
        window.append(torch.cat(columns).cpu())
        step_stats["grad_norm"] += float(grad_norm)
        if finite:
            optimizer.step()
            consecutive_nonfinite = 0
        else:
            state["nonfinite_steps"] += 1
            consecutive_nonfinite += 1
            say(f"step {step}: non-finite loss or gradient, step skipped ({consecutive_nonfinite} in a row)")
            if consecutive_nonfinite >= cfg.optim.max_consecutive_nonfinite:
                raise NonFiniteError(
                    f"{consecutive_nonfinite} consecutive non-finite steps ending at step {step} "
                    f"(loss {float(global_loss):.4g}, grad norm {float(grad_norm):.4g}); try a lower optim.lr "
                    f"(now {cfg.optim.lr:g}), a smaller loss.beta, optim.grad_clip, or fp32 (scaling.mixed_precision=fp32)"
                )
        optimizer.zero_grad(set_to_none=True)

        step_stats["seconds"] += time.perf_counter() - started
        step_stats["steps"] += 1
        if step == 1:  # the curves' step 0: the untrained policy, measured by this step's forward before its update
            worker.sink.log(_pair_window_metrics(cfg, window[-1:]), step=0)
        is_last = step == cfg.optim.max_steps
        if step % cfg.tracking.log_every_steps and step % cfg.checkpoint.every_steps and not is_last:
            continue

        metrics = _window_metrics(cfg, window, step_stats, lr, state["nonfinite_steps"])
        window.clear()
        step_stats = dict.fromkeys(step_stats, 0.0) | {"steps": 0}
        stop_reason = _stop_reason(cfg, metrics)  # identical on every rank: the metrics are gathered
        is_last = is_last or stop_reason is not None
        if (cfg.eval_every_steps and step % cfg.eval_every_steps == 0) or is_last:
            metrics |= run_eval()
        worker.sink.log(metrics, step=step)
        last_metrics = metrics
        say(f"step {step}/{cfg.optim.max_steps} " + _describe(metrics))
        if stop_reason is not None:
            worker.sink.tag(STOP_REASON_TAG, stop_reason)
            say(f"stopping early at step {step}: {stop_reason}")
        checkpoint_dir = None
        if step % cfg.checkpoint.every_steps == 0 or is_last:
            state["step"] = step
            checkpoint_dir = _save_checkpoint(policy, optimizer, state)
        worker.report(metrics | {"step": step} | _prefixed(state["eval_start"], EVAL_START_PREFIX), checkpoint_dir,
                      step)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the launcher has persisted it by now
        if stop_reason is not None:
            break

    lora_on = cfg.model.lora.r > 0
    # A LoRA adapter export needs only the adapters: rank 0 gathers those, not the whole model.
    full = distributed.full_state_dict(policy, trainable_only=lora_on and cfg.export.lora == "adapter")
    if rank == 0:
        export_location = storage.join(cfg.run_location, "export")
        with storage.local_dir(export_location) as out_dir:  # object storage: written here, then uploaded
            export_dir = (lora.export(full, cfg.model, cfg.export, tokenizer, out_dir) if lora_on
                          else export_pretrained(full, cfg.model, tokenizer, out_dir))
            write_model_card(export_dir, cfg, RunFacts(
                steps=state["step"], data_counts=[(split, stats.source, stats.counts()) for split, stats in
                                                  zip(("train", "eval"), data_stats, strict=False)],
                n_train_pairs=len(train_ds), n_eval_pairs=len(eval_ds) if eval_ds else 0, n_problems=len(problems),
                before=state["eval_start"], after=last_metrics, mlflow_run_id=worker.mlflow_run_id,
                stop_reason=stop_reason))
            if cfg.tracking.log_model:
                worker.sink.log_model(export_dir)
        say(f"exported the policy to {export_location} (model card: README.md)")
        worker.sink.tag(EXPORT_PATH_TAG, export_location)
        worker.sink.tag(EXPORT_URI_TAG, export_location if storage.is_remote(export_location)
                        else Path(export_location).resolve().as_uri())
    distributed.barrier()
    return state["eval_start"]


def precompute_reference(cfg: RunConfig, worker: Worker) -> None:
    """Only fill the reference log-prob cache of a `reference: precompute` config (a sweep does this
    once before its trials)."""
    assert cfg.reference == "precompute", cfg.reference
    say, device, tokenizer, (train_ds, eval_ds, _), mesh, mp_policy = _setup(cfg, worker)
    ref.build(cfg, (train_ds, eval_ds), tokenizer.pad_token_id, mesh, mp_policy, device, say)


def _stop_reason(cfg: RunConfig, metrics: dict[str, float]) -> str | None:
    stop = cfg.stop
    if stop.max_nonfinite_steps is not None and metrics["stability/nonfinite_steps"] >= stop.max_nonfinite_steps:
        return f"{int(metrics['stability/nonfinite_steps'])} non-finite steps (stop.max_nonfinite_steps)"
    if stop.max_chosen_drop is not None and metrics["delta_chosen/mean"] < -stop.max_chosen_drop:
        return f"chosen log-prob drift {metrics['delta_chosen/mean']:.3g} < -{stop.max_chosen_drop:g} (stop.max_chosen_drop)"
    return None


def _pair_window_metrics(cfg: RunConfig, window) -> dict[str, float]:
    """pair_metrics over the window's pairs of every rank (a collective: every rank calls it)."""
    losses, pc, pr, rc, rr, chosen_logits, rejected_logits = distributed.gather_cat(torch.cat(window)).unbind(1)
    return pair_metrics(losses=losses, policy_chosen_logps=pc, policy_rejected_logps=pr,
                        reference_chosen_logps=rc, reference_rejected_logps=rr, beta=cfg.loss.beta,
                        reject_threshold=cfg.loss.reject_threshold, policy_chosen_logits=chosen_logits,
                        policy_rejected_logits=rejected_logits)


def _window_metrics(cfg: RunConfig, window, step_stats, lr: float, nonfinite_steps: int) -> dict[str, float]:
    totals = distributed.all_reduce_sum(torch.tensor([step_stats["tokens"]], dtype=torch.float64))
    steps = max(step_stats["steps"], 1)
    return _pair_window_metrics(cfg, window) | {
        "grad_norm": step_stats["grad_norm"] / steps,
        "lr": lr,
        "perf/tokens_per_s": float(totals[0]) / max(step_stats["seconds"], 1e-9),
        "perf/step_time_s": step_stats["seconds"] / steps,
        "stability/nonfinite_steps": float(nonfinite_steps),
    }


def _save_checkpoint(policy, optimizer, state: dict) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=f"mdpo-ckpt-{state['step']:06d}-"))
    distributed.save_sharded(directory, policy, optimizer)
    if distributed.rank() == 0:
        (directory / STATE_FILE).write_text(json.dumps(state))
    return directory


def _data_tags(data_stats) -> dict[str, str]:
    out: dict[str, str] = {}
    for stats, split in zip(data_stats, ("train", "eval"), strict=False):
        out |= data_tags(split, stats.counts())  # one number per run: a column of the runs table, not a chart
    return out


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {prefix + key.removeprefix(EVAL_PREFIX): value for key, value in metrics.items()}


def _describe(metrics: dict[str, float]) -> str:
    names = {"loss": "loss", "rewards/margins": "margin", "delta_chosen/mean": "Δw", "delta_rejected/mean": "Δl",
             "rewards/accuracies": "reward_acc", "eval/answer_accuracy": "answer_acc",
             "eval/delta_chosen/mean": "eval Δw", "eval/delta_rejected/mean": "eval Δl",
             "eval/rewards/accuracies": "eval reward_acc", "perf/tokens_per_s": "tok/s"}
    return "  ".join(f"{short} {metrics[key]:.4g}" for key, short in names.items() if key in metrics)
