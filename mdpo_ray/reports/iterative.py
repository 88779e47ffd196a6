"""The iterate experiment's section of the results page (sweeps/iterative.yaml): held-out answer accuracy against
rounds per recipe, mean over seeds, and verdicts by the paired-by-seed rule below, written before the runs.

Reads only MLflow. A trial's recipe comes from its logged config (params), whatever the sweep searched. Every
trial run carries `eval/answer_accuracy` at step 0 and at the end of each round: an iterate run's parent at step
(r+1)·`optim.max_steps` (mdpo_ray.launch_rounds), a single run at its evaluations every that many steps
(`eval.every_steps` in the sweep file), so "after round r" means after r·`optim.max_steps` steps for every recipe.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from mdpo_ray.reports.results import Results, cell, code_commit, replace_section, shown_store
from mdpo_ray.reports.trials import trial_runs
from mdpo_ray.tracking.mlflow_runs import ROLE_TAG, SWEEP_TAG

ACC = "eval/answer_accuracy"
SECTION = "iterative"
SFT, RFT = "SFT", "RFT"
_NAMES = {"minor_dpo": "MinorDPO", "dpo": "DPO"}
RULE = ("A **beats** B when A's mean final held-out accuracy over the seeds both ran is higher and so is A's "
        "accuracy with every one of those seeds (each seed's paired difference A − B > 0); if neither beats the "
        "other, the comparison is **not shown**. Final = after the last round (plain SFT: after as many steps).")


def is_iterate_sweep(tracking_uri: str, parent_run_id: str) -> bool:
    """Whether any trial of the sweep ran iterate rounds (its MLflow run is an iterate parent)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(parent_run_id)
    return any(run.data.tags.get(ROLE_TAG) == "iterate"
               for run in trial_runs(client, parent.info.experiment_id, parent_run_id))


def recipe(loss: str, nll_weight: float, rounds: int) -> str:
    """'iterative MinorDPO + NLL 1', 'RFT' (sft in rounds: its own correct samples), 'SFT' (sft, no rounds)."""
    name = _NAMES.get(loss, loss)
    if not rounds:
        return SFT if loss == "sft" else f"{name} (no rounds)"
    if loss == "sft":
        return RFT
    return f"iterative {name}" + (f" + NLL {nll_weight:g}" if nll_weight else "")


def accuracy_frame(client: MlflowClient, runs: list) -> tuple[pd.DataFrame, int]:
    """(one row per finished trial and round reached: recipe, seed, round, steps, acc_points; the steps per round).

    The steps per round are the iterate trials' `optim.max_steps`; a single run's evaluation at k times that is
    its "round k"."""
    trials = []
    for run in runs:
        params = run.data.params
        trials.append({"run_id": run.info.run_id, "status": run.info.status, "seed": int(params["seed"]),
                       "rounds": int(params["iterate.rounds"]), "max_steps": int(params["optim.max_steps"]),
                       "recipe": recipe(params["loss.name"], float(params["loss.nll_weight"]),
                                        int(params["iterate.rounds"]))})
    seen: dict[tuple, str] = {}
    for trial in trials:
        if (twin := seen.setdefault((trial["recipe"], trial["seed"]), trial["run_id"])) != trial["run_id"]:
            raise ValueError(f"the iterate report compares recipes (loss.name, loss.nll_weight, iterate.rounds) over "
                             f"seeds, but runs {twin} and {trial['run_id']} are both {trial['recipe']} with seed "
                             f"{trial['seed']}: sweep nothing else (sweeps/iterative.yaml)")
    round_steps = {t["max_steps"] for t in trials if t["rounds"]}
    if len(round_steps) != 1:
        raise ValueError("the iterate report compares recipes round by round: its iterate trials must share one "
                         f"optim.max_steps (steps per round); found {sorted(round_steps) or 'no iterate trial'}")
    per_round = round_steps.pop()
    rows = []
    for trial in trials:
        if trial["status"] != "FINISHED":
            continue
        history = {m.step: m.value for m in client.get_metric_history(trial["run_id"], ACC)}
        steps = trial["rounds"] * trial["max_steps"] or trial["max_steps"]
        rows += [{**trial, "round": step // per_round, "step": step, "steps": steps, "acc_points": 100 * value}
                 for step, value in sorted(history.items()) if step % per_round == 0 and step <= steps]
    columns = ["recipe", "seed", "round", "step", "steps", "acc_points", "status", "rounds", "max_steps", "run_id"]
    return pd.DataFrame(rows, columns=columns), per_round


def final_accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    """Each finished trial's last evaluation (its final round), one row per (recipe, seed)."""
    last = frame[frame["step"] == frame["steps"]]
    return last.pivot_table(index="seed", columns="recipe", values="acc_points", aggfunc="mean")


def compare(finals: pd.DataFrame, a: str, b: str) -> tuple[str, str]:
    """(verdict, the figures) of recipe a against b by RULE: 'beats', 'is beaten by', 'not shown', 'not tested'."""
    if a not in finals or b not in finals:
        missing = " and ".join(r for r in (a, b) if r not in finals)
        return "not tested", f"no finished {missing} trials"
    both = finals[[a, b]].dropna()
    if both.empty:
        return "not tested", "no seed ran both"
    diff = both[a] - both[b]
    verdict = "beats" if (diff > 0).all() else "is beaten by" if (diff < 0).all() else "not shown"
    seeds = ", ".join(f"seed {seed}: {d:+.1f}" for seed, d in diff.items())
    return verdict, (f"{a} {both[a].mean():.1f} vs {b} {both[b].mean():.1f} points over {len(both)} seed(s); "
                     f"paired differences {seeds}")


def verdicts(finals: pd.DataFrame) -> list[str]:
    """The three questions of issue 25, each decided by RULE for every MinorDPO recipe the sweep ran."""
    minor = sorted(r for r in finals if r.startswith("iterative MinorDPO"))
    lines = ["### Verdicts", "", f"Rule, fixed before the runs: {RULE}", ""]
    if not minor:
        return lines + ["No finished iterative MinorDPO trials: nothing to compare yet.", ""]
    questions = [("Iterative MinorDPO beats plain SFT", [(m, SFT) for m in minor]),
                 ("Iterative MinorDPO beats RFT", [(m, RFT) for m in minor]),
                 ("MinorDPO vs DPO under iteration", [(m, m.replace("MinorDPO", "DPO")) for m in minor])]
    for number, (question, pairs) in enumerate(questions, 1):
        lines.append(f"{number}. **{question}**")
        for a, b in pairs:
            verdict, figures = compare(finals, a, b)
            said = f"{a} vs {b}: {verdict}" if verdict.startswith("not") else f"{a} {verdict} {b}"
            lines.append(f"   - **{said}** ({figures}).")
    return lines + [""]


def _table(frame: pd.DataFrame, rounds: int) -> list[str]:
    header = ["recipe", "steps", "start", *(f"after round {r}" for r in range(1, rounds + 1))]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name in _order(frame["recipe"]):
        rows = frame[frame["recipe"] == name]
        cells = [cell(rows[rows["round"] == r]["acc_points"], ".1f") for r in range(rounds + 1)]
        lines.append(f"| {name} | {int(rows['steps'].max())} | " + " | ".join(cells) + " |")
    return lines


def _order(recipes) -> list[str]:
    def rank(name: str):
        return (name in (RFT, SFT), name == SFT, "DPO" in name and "MinorDPO" not in name, "NLL" in name, name)
    return sorted(set(recipes), key=rank)


def _plot(frame: pd.DataFrame, rounds: int, path: Path) -> Path:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    colors = colormaps["tab10"]
    for i, name in enumerate(_order(frame["recipe"])):
        stats = frame[frame["recipe"] == name].groupby("round")["acc_points"].agg(["mean", "std"]).reset_index()
        ax.errorbar(stats["round"], stats["mean"], yerr=stats["std"].fillna(0), label=name, color=colors(i),
                    marker="o", capsize=3, ls="--" if name in (SFT, RFT) else "-")
    ax.set_xticks(range(rounds + 1))
    ax.set_xlabel("round (plain SFT: the same steps)")
    ax.set_ylabel("held-out answer accuracy (points)")
    ax.set_title("mean ± std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right center", fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def write_iterative_results(tracking_uri: str, parent_run_id: str, out_path: Path, *, command: str,
                            sweep_file: str | None = None) -> Results:
    """Write (or replace) the iterate section of `out_path` and, in `<stem>/iterative/`, trials.csv and the plot;
    the rest of the page is kept."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = trial_runs(client, parent.info.experiment_id, parent_run_id)
    if not runs:
        raise ValueError(f"sweep parent run {parent_run_id} has no trial runs yet")
    frame, per_round = accuracy_frame(client, runs)
    rounds = max(int(run.data.params["iterate.rounds"]) for run in runs)
    assets = out_path.parent / out_path.stem / SECTION
    assets.mkdir(parents=True, exist_ok=True)
    csv_path = assets / "trials.csv"
    frame.sort_values(["recipe", "seed", "round"]).to_csv(csv_path, index=False, float_format="%.6g")  # 47.6, not 47.599999999999994
    plot = _plot(frame, rounds, assets / "accuracy_vs_round.png")
    finals = final_accuracy(frame)
    started = datetime.fromtimestamp(parent.info.start_time / 1000, timezone.utc)
    minutes = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 60000
    store, n_finished = shown_store(tracking_uri), sum(run.info.status == "FINISHED" for run in runs)
    relative = f"{out_path.stem}/{SECTION}"
    lines = [
        "## Iterative on-policy training: does iterative MinorDPO beat SFT?", "",
        (f"Generated by `{command}` from sweep `{parent.data.tags.get(SWEEP_TAG)}` (MLflow parent run "
         f"`{parent_run_id}`, store `{store}`), started {started:%Y-%m-%d %H:%M} UTC, {minutes:.0f} min wall-clock, "
         f"{len(runs)} trials ({n_finished} finished), code `{code_commit()}`; rerun with "
         f"`mdpo-ray sweep {sweep_file or '<the sweep file>'}`. Per-trial, per-round figures: "
         f"[trials.csv]({relative}/trials.csv)."), "",
        (f"Every recipe starts from the same SFT model and trains {per_round} optimizer steps per round "
         f"({rounds} rounds); plain SFT trains as many steps in one run on the original chosen answers. RFT is "
         "SFT on the chosen answers of each round's pairs: one of the policy's own samples that the verifier "
         "called correct. Held-out answer accuracy is greedy decoding on the held-out problems."), "",
        *verdicts(finals),
        "### Held-out answer accuracy by round (points, mean ± std over seeds)", "",
        *_table(frame, rounds), "",
        f"![accuracy by round]({relative}/{plot.name})", "",
        "### Limits", "",
        ("- One small model on synthetic arithmetic, one learning rate (the best of the single-round sweep above), "
         "one β and few rounds: the verdicts are about this setting only."),
        ("- Prompts whose samples were all correct or all wrong give no pair, for every iterative recipe alike, so "
         "RFT here does not train on the prompts the policy already always solves."),
        "- Each round is a fresh run: the optimizer state and the learning-rate warm-up restart every round.",
    ]
    replace_section(out_path, SECTION, "\n".join(lines) + "\n")
    return Results(markdown_path=out_path, csv_path=csv_path, plots=[plot], n_trials=len(runs), n_finished=n_finished)
