"""argv -> config -> launch. No logic: a bad config exits 2 here, before Ray is asked for anything; train
and sweep print the memory plan's one-line verdict first (mdpo_ray.planning.planner)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mdpo_ray.config import ConfigError, check_storage_outlives_job, load_config, to_yaml
from mdpo_ray.planning import planner
from mdpo_ray.planning.planner import DEFAULT_COMPLETION_FRACTION, DEFAULT_GPU_MEMORY_GIB


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdpo-ray", description="MinorDPO preference training on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train one run (no config: the built-in arithmetic task)"),
                       ("config", "print the resolved config as YAML and exit")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("config", nargs="?", help="run YAML (see sweeps/runs/ and README.md); default: built-in")
        _add_overrides(sub)
    text = "per-GPU peak memory of a run and whether it fits (reads the model's config only; no Ray)"
    sub = commands.add_parser("plan", help=text, description=text)
    sub.add_argument("config", nargs="?", help="run YAML; default: built-in")
    _add_overrides(sub)
    sub.add_argument("--gpus", type=int, help="ranks to plan for (default: scaling.num_workers)")
    sub.add_argument("--gpu-memory-gib", type=float, default=DEFAULT_GPU_MEMORY_GIB, help="memory of one GPU")
    sub.add_argument("--completion-fraction", type=float, default=DEFAULT_COMPLETION_FRACTION,
                     help="share of each sequence's tokens that are completion (scored) tokens")
    sub = commands.add_parser("sweep", help="run a Ray Tune sweep from a sweep YAML")
    sub.add_argument("sweep", help="sweep YAML, e.g. sweeps/smoke.yaml")
    sub.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    _add_overrides(sub, "of every trial's base run config")
    sub = commands.add_parser("report", help="write a sweep's table and plots (and attach them in MLflow)")
    sub.add_argument("sweep", help="the sweep YAML the sweep was launched with")
    sub.add_argument("--results", metavar="PATH.md", help="also write the evidence page (loss x beta x lr, mean ± "
                     "std over seeds, verdicts on the paper's claims), e.g. docs/results.md; for a sweep of "
                     "iterate runs, its own section of that page (accuracy by round, verdicts against SFT and RFT)")
    sub.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    text = "regenerate the reference pages (configuration.md, metrics.md) from the code"
    sub = commands.add_parser("docs", help=text, description=text)
    sub.add_argument("--dir", default="docs", help="where the pages live (default: docs, from the repository root)")
    sub.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the pages that differ")
    return parser


def _add_overrides(sub: argparse.ArgumentParser, what: str = "") -> None:
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help=f"override a dotted key {what}, e.g. --set loss.beta=0.3 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.command == "docs":
        return _docs_command(args)
    try:
        return _sweep_command(args) if args.command in ("sweep", "report") else _run_command(args)
    except ConfigError as exc:  # a bad config or bad data (a DataError), found here or once the run started
        # (MLflow refusing the config, a Train worker's DataError)
        if (cluster := sys.modules.get("mdpo_ray.cluster")) is not None:
            cluster.stop_ray()  # Ray prints the log lines it holds back as it stops: before the message, not after
        print(f"mdpo-ray: {exc}", file=sys.stderr)
        return 2


def _docs_command(args: argparse.Namespace) -> int:
    from mdpo_ray import reference_pages

    docs = Path(args.dir)
    if not args.check:
        print("wrote " + ", ".join(str(path) for path in reference_pages.write(docs)))
        return 0
    stale = reference_pages.drifted(docs)
    for path in stale:
        print(f"mdpo-ray: {path} differs from what the code generates; run `mdpo-ray docs`", file=sys.stderr)
    return 1 if stale else 0


def _run_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(to_yaml(cfg), end="")
        return 0
    if args.command == "plan":  # advice: exit 0 whether it fits or not
        print(planner.report(planner.plan(cfg, gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib,
                                          completion_fraction=args.completion_fraction)))
        return 0
    check_storage_outlives_job(cfg)  # under `ray job submit`, a relative output_dir would be lost
    print(planner.preflight(cfg), flush=True)
    from mdpo_ray import launch  # imports Ray; only after the config is known to be good

    launch.check_data(cfg)  # and the data: a DataError is a ConfigError, exit 2 with no run opened
    print(launch.describe(launch.train(cfg)))
    return 0


def _sweep_command(args: argparse.Namespace) -> int:
    from mdpo_ray.sweep_config import load_sweep, trial_config

    sweep, base = load_sweep(args.sweep, args.overrides)
    from mdpo_ray import sweep as sweeps  # imports Ray; only after the sweep is known to be good
    from mdpo_ray.tracking import mlflow_runs

    shared = sweeps.shared_run_keys(sweep, base)
    cfg = trial_config(base, shared | {"name": "probe"})
    check_storage_outlives_job(cfg)
    if args.command == "report":
        from mdpo_ray.reports.trials import find_sweep_parent

        mlflow_runs.require_reachable(cfg, "the report reads the sweep's trials from it")
        try:
            parent = find_sweep_parent(cfg.mlflow_uri, cfg.tracking.experiment, sweep.name)
            report = sweeps.write_sweep_report(cfg, parent)
        except ValueError as exc:  # no such sweep in this store, or no trials yet
            print(f"mdpo-ray: {exc}", file=sys.stderr)
            return 1
        print(f"report: {report.markdown_path} (+ trials.html, trials.csv, "
              f"{len(report.plots)} plots); "
              f"best trial {report.best_trial_id}")
        if args.results:
            from mdpo_ray.reports.iterative import is_iterate_sweep, write_iterative_results
            from mdpo_ray.reports.results import write_results

            # An iterate sweep (sweeps/iterative.yaml) writes its own section of the page; others the lr page.
            write = write_iterative_results if is_iterate_sweep(cfg.mlflow_uri, parent) else write_results
            try:
                results = write(cfg.mlflow_uri, parent, Path(args.results), command="mdpo-ray " + " ".join(args.argv),
                                sweep_file=args.sweep)
            except ValueError as exc:  # not a sweep over losses and learning rates
                print(f"mdpo-ray: {exc}", file=sys.stderr)
                return 1
            print(f"results: {results.markdown_path} ({results.n_finished} of {results.n_trials} trials finished; "
                  f"per-trial figures in {results.csv_path})")
        return 0
    print(planner.preflight(cfg, "plan (a trial with the sweep's shared keys)"), flush=True)
    summary = sweeps.run_sweep(sweep, base, resume=args.resume)
    print(sweeps.describe(summary, mlflow_runs.ui_command(cfg)))
    return 130 if summary.unfinished else 0  # 130: interrupted, as a shell reports Ctrl-C


if __name__ == "__main__":
    raise SystemExit(main())
