"""The Ray boundary of iterative on-policy training (`iterate.rounds` > 0; docs/iterate.md).

Each round: Ray actors sample completions of the round's training prompts from the round's start policy
(round 0: `model.name_or_path`; round r: round r-1's export), the driver verifies and pairs them
(mdpo_ray.iterate), saves the pairs, then runs one Ray Train run of the configured loss on them
(mdpo_ray.launch.train). One MLflow parent run holds the per-round figures; each round's run is its child.

Resume is by files, written in order under output_dir/<name>/iterate/round_<r>/ (mdpo_ray.iterate.store):
pairs (read back, not resampled), the round's checkpoints (its Ray Train run resumes from them), then
done.json (the round is skipped).

With LoRA and `export.lora: adapter`, each round exports its merged model (the next round's start) and its adapter;
the run's export is the rounds' adapters stacked into one over the initial model (mdpo_ray.iterate.adapters).
"""

from __future__ import annotations

from pathlib import Path

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mdpo_ray import cluster, launch, storage
from mdpo_ray.config import ConfigError, ModelConfig, RunConfig, validate_config
from mdpo_ray.iterate import store
from mdpo_ray.iterate.sample import HFGenerator, sample_round
from mdpo_ray.iterate.verify import Pairing, Verifier, load_verifier

ACCURACY, START_ACCURACY = "eval/answer_accuracy", "eval_start/answer_accuracy"  # after / before a round's training


@ray.remote
class Sampler:
    """One sampling actor: the round's start policy in this process, behind the one-method backend
    (mdpo_ray.iterate.sample.Generator); a vLLM engine would be another backend built here."""

    def __init__(self, model: dict, *, use_gpu: bool, mixed_precision: str, max_new_tokens: int,
                 batch_size: int) -> None:
        import torch

        from mdpo_ray.training.distributed import compute_dtype
        from mdpo_ray.training.model import load_causal_lm, load_tokenizer

        model_cfg = ModelConfig.model_validate(model)
        device = torch.device("cuda" if use_gpu else "cpu")  # Ray made the actor's one GPU its cuda:0
        # In the dtype training computes in: bf16 on GPUs with bf16 units, loaded so (half a 7B model's 28 GB)
        policy = load_causal_lm(model_cfg, trainable=False, dtype=compute_dtype(mixed_precision, device))
        self.backend = HFGenerator(policy.to(device), load_tokenizer(model_cfg), max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)

    def sample(self, prompts: list, *, n: int, temperature: float, seed: int) -> list[list[str]]:
        return self.backend.sample(prompts, n=n, temperature=temperature, seed=seed)


class ActorGenerator:
    """The Generator interface over sampling actors: the prompts cut into contiguous shares, one per actor,
    sampled in parallel; share i is seeded from (seed, i), so a fixed number of actors samples reproducibly."""

    def __init__(self, actors: list) -> None:
        self.actors = actors

    def sample(self, prompts: list, *, n: int, temperature: float, seed: int) -> list[list[str]]:
        size = -(-len(prompts) // len(self.actors))
        shares = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        futures = [actor.sample.remote(share, n=n, temperature=temperature, seed=seed * 65_537 + i)
                   for i, (actor, share) in enumerate(zip(self.actors, shares, strict=False))]
        return [completions for part in ray.get(futures) for completions in part]


def start_samplers(cfg: RunConfig, start_model: str) -> list:
    """One sampling actor of `start_model` per Train worker's resources. A lost actor (its process killed, its node
    gone) is restarted once, and the share it was sampling is sampled again, the same, since a share is seeded."""
    scaling = cfg.scaling
    # Outside any enclosing placement group: a Tune trial's captures its child actors by default, and holds only
    # the trial driver's token CPU (mdpo_ray.sweep_trial), where a sampler would wait forever.
    options = {"num_cpus": scaling.cpus_per_worker, "num_gpus": scaling.gpus_per_worker if scaling.use_gpu else 0,
               "max_restarts": 1, "max_task_retries": 1,
               "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)}
    model = cfg.model.model_dump(mode="json") | {"name_or_path": start_model, "reference": None}
    return [Sampler.options(**options).remote(model, use_gpu=scaling.use_gpu, mixed_precision=scaling.mixed_precision,
                                              max_new_tokens=cfg.eval.max_new_tokens,
                                              batch_size=cfg.eval.generation_batch_size)
            for _ in range(scaling.num_workers)]


def sample_pairs(cfg: RunConfig, start_model: str, rows: list[dict], verifier: Verifier, round_index: int) -> Pairing:
    """Round `round_index`'s pairs, sampled by the round's actors (start_samplers), which are let go before the
    round trains."""
    actors = start_samplers(cfg, start_model)
    try:
        return sample_round(ActorGenerator(actors), rows, cfg.iterate, verifier, seed=cfg.seed,
                            round_index=round_index)
    finally:
        for actor in actors:
            ray.kill(actor)


def round_config(cfg: RunConfig, round_index: int, start_model: str) -> RunConfig:
    """Round `round_index`'s single run: its saved pairs as `data.train`, from `start_model`, under the round's
    folder, logging to the iterate run's MLflow store; its reference per `iterate.reference`."""
    location = store.round_location(cfg.run_location, round_index)
    raw = cfg.model_dump(mode="json")
    raw |= {"name": f"{cfg.name}-round-{round_index}", "output_dir": location, "iterate": {"rounds": 0}}
    # The saved pairs have a prompt column (a text, or messages with the answers as assistant turns), whatever
    # the format of data.train, whose rows may have had none (implicit): the format is read from the pairs.
    raw["data"] |= {"train": storage.join(location, store.PAIRS_FILE), "format": "auto"}
    raw["tracking"] |= {"mlflow_uri": cfg.mlflow_uri}
    if cfg.model.lora.r and cfg.export.lora != "merged":
        # The next round starts from the merged model; the run's own export stacks the rounds' adapters.
        raw["export"] |= {"lora": "both"}
    reference = cfg.model.reference  # round 0 (and `initial`): the configured reference
    if round_index and cfg.iterate.reference == "previous":
        reference = None  # the round's start policy
    elif round_index:
        reference = reference or cfg.model.name_or_path
    raw["model"] |= {"name_or_path": start_model, "reference": reference}
    return validate_config(raw, source=f"iterate round {round_index}")


def train_rounds(cfg: RunConfig, *, tags: dict[str, str] | None = None,
                 callbacks: list | None = None) -> launch.RunSummary:
    """`iterate.rounds` rounds of sample, verify, train; finished rounds (done.json) are skipped."""
    from mdpo_ray.data.formats import prompt_rows
    from mdpo_ray.tracking import mlflow_runs

    cfg = launch.resolve_builtin(cfg)
    if cfg.model.lora.r and cfg.export.lora == "adapter":  # a rerun whose finished rounds ran merged: said before any
        finished = (store.load_done(store.round_location(cfg.run_location, r)) for r in range(cfg.iterate.rounds))
        _adapter_dirs([record for record in finished if record is not None])  # round trains, not after them all
    rows = prompt_rows(cfg.data.train, split=cfg.data.train_split, format=cfg.data.format)
    verifier = load_verifier(cfg.iterate)
    records = []
    with launch.tracked_run(cfg, (tags or {}) | {mlflow_runs.ROLE_TAG: "iterate"}) as parent:
        cluster.init_ray(use_gpu=cfg.scaling.use_gpu)
        start_model = cfg.model.name_or_path
        for r in range(cfg.iterate.rounds):
            record = _run_round(cfg, r, start_model, rows, verifier, parent, callbacks)
            records.append(record)
            start_model = record["export"]
        export = stacked_export(cfg, records) if cfg.model.lora.r and cfg.export.lora == "adapter" else start_model
    first, last = records[0], records[-1]
    metrics = last["metrics"] | {key: value for key, value in first["metrics"].items() if key.startswith("eval_start/")}
    export = export if storage.is_remote(export) else Path(export)
    return launch.RunSummary(config=cfg, mlflow_run_id=parent, metrics=metrics, checkpoint=last["checkpoint"],
                             export_dir=export)


def stacked_export(cfg: RunConfig, records: list[dict]) -> str:
    """The iterate run's `export.lora: adapter` export: the finished rounds' adapters (`records`, in round order;
    each round exported `both`) stacked into one over `model.name_or_path`, written where a single run's export
    goes. Redone whole on a rerun, so rounds added later are in it."""
    from mdpo_ray.iterate import adapters

    dirs = _adapter_dirs(records)
    location = storage.join(cfg.run_location, "export")
    config = adapters.write_stacked(dirs, cfg.model.name_or_path, location, run_name=cfg.name)
    print(f"iterate: the {len(dirs)} rounds' adapters stacked into one of rank {config['r']} over "
          f"{cfg.model.name_or_path}: {location}", flush=True)
    return location


def _adapter_dirs(records: list[dict]) -> list[str]:
    """Each finished round's adapter directory; a ConfigError if a round exported none (it ran merged)."""
    from mdpo_ray.iterate import adapters
    from mdpo_ray.training.lora import ADAPTER_DIR

    dirs = [storage.join(record["export"], ADAPTER_DIR) for record in records]
    for record, adapter_dir in zip(records, dirs, strict=True):
        if not storage.is_file(storage.join(adapter_dir, adapters.CONFIG_FILE)):
            raise ConfigError(
                f"export.lora=adapter stacks every round's adapter, but iterate round {record['round']} exported none "
                f"({adapter_dir} is missing): it ran with export.lora=merged, which exports the merged model only. Set "
                "export.lora=merged to keep this run's rounds, or start the iterate run afresh under another name")
    return dirs


def _run_round(cfg: RunConfig, r: int, start_model: str, rows: list[dict], verifier: Verifier, parent: str | None,
               callbacks: list | None) -> dict:
    """Round r, from whichever of its files exist: done.json (skip), pairs (train), nothing (sample, train)."""
    from mdpo_ray.tracking import mlflow_runs

    location = store.round_location(cfg.run_location, r)
    done = store.load_done(location)
    if done is not None:
        print(f"iterate round {r}: finished before ({location}/{store.DONE_FILE}); skipped", flush=True)
        return done
    pairing, read_back = store.sampled_once(location, lambda: sample_pairs(cfg, start_model, rows, verifier, r))
    print(f"iterate round {r}: {len(pairing.pairs)} pairs ({'read back from' if read_back else 'sampled into'} "
          f"{location}); prompts all correct {pairing.prompts_all_correct}, all wrong {pairing.prompts_all_wrong}; "
          f"sample accuracy {pairing.correct}/{pairing.samples}", flush=True)
    if not pairing.pairs:
        raise ConfigError(
            f"iterate round {r} sampled no pair: of its prompts, {pairing.prompts_all_correct} had only correct and "
            f"{pairing.prompts_all_wrong} only wrong completions. Raise iterate.samples_per_prompt or "
            "iterate.temperature, or start from a model that is right on some prompts but not all")
    round_cfg = round_config(cfg, r, start_model)
    child_tags = {"mlflow.parentRunId": parent, mlflow_runs.ITERATE_ROUND_TAG: str(r)} if parent else {}
    summary = launch.train(round_cfg, tags=child_tags, callbacks=callbacks)
    mlflow_runs.log_metrics(cfg, parent, pairing.metrics() | _renamed(summary.metrics, {ACCURACY: "iterate/answer_accuracy"}),
                            step=r)
    # The parent's held-out answer accuracy at the optimizer steps trained so far (round 0's start at step 0): the
    # iterate run read like a single run of rounds × optim.max_steps steps, which a sweep ranks and plots it by.
    if r == 0:
        mlflow_runs.log_metrics(cfg, parent, _renamed(summary.metrics, {START_ACCURACY: ACCURACY}), step=0)
    mlflow_runs.log_metrics(cfg, parent, _renamed(summary.metrics, {ACCURACY: ACCURACY}),
                            step=(r + 1) * cfg.optim.max_steps)
    record = {"round": r, "start_model": start_model, "export": str(summary.export_dir),
              "checkpoint": summary.checkpoint, "mlflow_run_id": summary.mlflow_run_id,
              "metrics": {key: float(value) for key, value in summary.metrics.items()
                          if isinstance(value, (int, float))}}
    store.save_done(location, record)
    return record


def _renamed(metrics: dict, names: dict[str, str]) -> dict[str, float]:
    """{new: metrics[old]} for each old -> new that `metrics` has (a run without generation eval has none)."""
    return {new: float(metrics[old]) for old, new in names.items() if old in metrics}
