"""The sweep report against a real (sqlite) MLflow store holding a hand-made 2x2 sweep; no Ray.

Trials over loss.beta x loss.reject_threshold, final eval/answer_accuracy (the sweep metric):
    beta=0.1, tau=0.0 -> 0.40    beta=0.1, tau=-1.0 -> 0.55
    beta=0.3, tau=0.0 -> 0.70    beta=0.3, tau=-1.0 -> 0.60
every trial starts at 0.50 at step 0, so the 0.40 trial's best-over-history is 0.50 (step 0) and
not its final value. A fifth trial FAILED at start and logged nothing.
"""

import base64
import json
import math

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mdpo_ray.reports.report import write_report
from mdpo_ray.reports.trials import cell_means, find_sweep_parent

GRID = {  # trial -> (beta, reject_threshold, final answer accuracy, final eval Δw)
    "t_00000": (0.1, 0.0, 0.40, -2.0),
    "t_00001": (0.1, -1.0, 0.55, -0.5),
    "t_00002": (0.3, 0.0, 0.70, 0.25),
    "t_00003": (0.3, -1.0, 0.60, 1.0),
}
TRIALS = {**GRID, "t_00004": (0.1, 0.0, None, None)}  # and one that failed before logging anything
STEPS = (0, 10, 20, 30)


def _shown_name(beta: float, tau: float, trial: str) -> str:
    return f"minor_dpo b={beta:g} tau={tau:g} [{trial}]"


def _make_sweep(client: MlflowClient, experiment_id: str, name: str, mode: str) -> str:
    parent = client.create_run(experiment_id, run_name=name, tags={
        "mdpo.sweep": name, "mdpo.role": "sweep", "mdpo.search_keys": "loss.beta,loss.reject_threshold",
        "mdpo.metric": "eval/answer_accuracy", "mdpo.mode": mode}).info.run_id
    for trial, (beta, tau, accuracy, drift) in TRIALS.items():
        # Named in MLflow by its overrides, as a sweep names its trials; mdpo.run_name is the run's `name`.
        run_id = client.create_run(experiment_id, run_name=_shown_name(beta, tau, trial), tags={
            "mlflow.parentRunId": parent, "mdpo.sweep": name, "mdpo.trial_id": trial,
            "mdpo.run_name": f"{name}-{trial}", "override.loss.beta": str(beta),
            "override.loss.reject_threshold": str(tau)}).info.run_id
        client.log_param(run_id, "loss.beta", str(beta))
        if accuracy is None:
            client.set_terminated(run_id, status="FAILED")
            continue
        for step in STEPS:
            frac = step / STEPS[-1]
            client.log_metric(run_id, "logps/chosen", -10.0 + drift * frac, step=step)
            client.log_metric(run_id, "logps/rejected", -10.0 - 5 * beta * frac, step=step)
            client.log_metric(run_id, "rewards/margins", beta * (drift + 5 * beta) * frac, step=step)
        for step, value in ((0, 0.5), (STEPS[-1], accuracy)):
            client.log_metric(run_id, "eval/answer_accuracy", value, step=step)
            client.log_metric(run_id, "eval/delta_chosen/mean", drift * step / STEPS[-1], step=step)
        client.set_terminated(run_id, status="FINISHED")
    client.set_terminated(parent, status="FINISHED")
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("sweeps", artifact_location=(root / "artifacts").as_uri())
    parents = {mode: _make_sweep(client, experiment_id, f"grid-{mode}", mode) for mode in ("max", "min")}
    return uri, client, parents


@pytest.fixture(scope="module")
def max_report(store, tmp_path_factory):
    uri, _, parents = store
    return write_report(uri, parents["max"], tmp_path_factory.mktemp("report"))


def test_find_sweep_parent(store):
    uri, _, parents = store
    assert find_sweep_parent(uri, "sweeps", "grid-max") == parents["max"]
    assert find_sweep_parent(uri, "sweeps", "grid-min") == parents["min"]
    with pytest.raises(ValueError, match="no sweep named 'nope'"):
        find_sweep_parent(uri, "sweeps", "nope")
    with pytest.raises(ValueError, match="no MLflow experiment"):
        find_sweep_parent(uri, "other", "grid-max")


def test_table_rows_and_final_values(max_report):
    table = pd.read_csv(max_report.csv_path)
    assert max_report.n_trials == len(table) == 5
    assert list(table.columns[:6]) == ["trial_id", "run_name", "status", "stop_reason", "loss.beta",
                                       "loss.reject_threshold"]
    # Sorted best first (max), the metric-less FAILED trial last.
    assert list(table["trial_id"]) == ["t_00002", "t_00003", "t_00001", "t_00000", "t_00004"]
    rows = table.set_index("trial_id")
    for trial, (beta, tau, accuracy, drift) in GRID.items():
        assert rows.loc[trial, "loss.beta"] == beta and rows.loc[trial, "loss.reject_threshold"] == tau
        assert rows.loc[trial, "run_name"] == _shown_name(beta, tau, trial)  # the name the MLflow UI shows
        assert rows.loc[trial, "eval/answer_accuracy"] == pytest.approx(accuracy)
        assert rows.loc[trial, "eval/answer_accuracy (best)"] == pytest.approx(max(accuracy, 0.5))
        assert rows.loc[trial, "logps/chosen"] == pytest.approx(-10.0 + drift)
        assert rows.loc[trial, "eval/delta_chosen/mean"] == pytest.approx(drift)
        assert rows.loc[trial, "status"] == "FINISHED"
    failed = rows.loc["t_00004"]
    assert failed["status"] == "FAILED" and math.isnan(failed["eval/answer_accuracy"])
    assert math.isnan(failed["logps/chosen"]) and math.isnan(failed["eval/rewards/accuracies"])


def test_best_trial_and_markdown(max_report):
    assert max_report.best_trial_id == "t_00002" and max_report.best_value == pytest.approx(0.70)
    text = max_report.markdown_path.read_text()
    assert "Best trial: `t_00002`" in text and "`loss.beta=0.3`" in text and "0.7" in text
    assert text.count("\n| t_0000") == 5


def test_the_parent_run_shows_the_best_trial(store, max_report):
    _, client, parents = store
    parent = client.get_run(parents["max"])
    best = client.get_run(max_report.best_run_id)
    assert best.data.tags["mdpo.trial_id"] == "t_00002" and parent.data.tags["mdpo.best_trial"] == best.info.run_id
    assert parent.data.metrics == best.data.metrics  # its final metrics, as the parent's own
    assert {m.step for m in client.get_metric_history(parent.info.run_id, "eval/answer_accuracy")} == {STEPS[-1]}
    assert f"[{best.info.run_name}](#/experiments/{best.info.experiment_id}/runs/{best.info.run_id})" in \
        parent.data.tags["mlflow.note.content"]


def test_mode_min_picks_the_other_end(store, tmp_path):
    uri, _, parents = store
    report = write_report(uri, parents["min"], tmp_path, attach=False)
    assert report.best_trial_id == "t_00000" and report.best_value == pytest.approx(0.40)
    table = pd.read_csv(report.csv_path)
    assert list(table["trial_id"]) == ["t_00000", "t_00001", "t_00003", "t_00002", "t_00004"]
    assert table.loc[0, "eval/answer_accuracy (best)"] == pytest.approx(0.40)  # min over its history


def test_plots_are_pngs_and_attached(store, max_report):
    _, client, parents = store
    names = {p.name for p in max_report.plots}
    assert names == {"heatmap_answer_accuracy.png", "heatmap_reward_margin.png", "heatmap_chosen_drift.png",
                     "logps_curves.png"}
    for path in max_report.plots:
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000
    attached = {a.path for a in client.list_artifacts(parents["max"], "report")}
    assert attached == {f"report/{name}" for name in names | {"trials.csv", "trials.json", "trials.md", "trials.html"}}


def test_html_report_is_self_contained(max_report):
    """The page MLflow previews: every plot inside it as a data URI, every trial a row, no outside links."""
    text = max_report.html_path.read_text()
    for path in max_report.plots:
        encoded = base64.b64encode(path.read_bytes()).decode()
        assert f'src="data:image/png;base64,{encoded}"' in text
    # Nothing loaded from outside ("http" alone could occur inside base64 by chance).
    assert text.count('src="') == len(max_report.plots) and "href=" not in text and "<script" not in text
    assert "Best trial: <code>t_00002</code>" in text and "<code>loss.beta=0.3</code>" in text
    # One row per trial, best first, each starting with its trial id and run name.
    rows = [text.index(f"<td>{trial}</td>\n      <td>{_shown_name(*TRIALS[trial][:2], trial)}</td>")
            for trial in ("t_00002", "t_00003", "t_00001", "t_00000", "t_00004")]
    assert rows == sorted(rows) and text.count("<tr>") == len(rows)  # body rows; the header row has a style


def test_trials_table_is_an_mlflow_table(store, max_report, monkeypatch, tmp_path):
    uri, client, parents = store
    write_report(uri, parents["max"], tmp_path)  # a second report (mdpo-ray report) replaces the table
    parent = client.get_run(parents["max"])
    assert json.loads(parent.data.tags["mlflow.loggedArtifacts"]) == [{"path": "report/trials.json", "type": "table"}]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # load_table searches runs through the global client
    loaded = client.load_table(parent.info.experiment_id, "report/trials.json", run_ids=[parent.info.run_id])
    table = pd.read_csv(max_report.csv_path)  # the same rows and columns as trials.csv
    assert list(loaded.columns) == list(table.columns) and list(loaded["trial_id"]) == list(table["trial_id"])
    np.testing.assert_allclose(loaded["eval/answer_accuracy"], table["eval/answer_accuracy"])


def test_cell_means_average_shared_cells():
    frame = pd.DataFrame({"a": [1.0, 1.0, 2.0, 2.0], "b": [0.0, 0.0, 0.0, 1.0], "m": [0.2, 0.4, 0.5, np.nan]})
    xs, ys, means, counts = cell_means(frame, ["a", "b"], "m")
    assert xs == [1.0, 2.0] and ys == [0.0]  # the NaN trial leaves no cell behind
    np.testing.assert_allclose(means, [[0.3, 0.5]])
    assert counts.tolist() == [[2, 1]]
    xs, ys, means, _ = cell_means(frame, ["a"], "m")
    assert ys == [None] and means.shape == (1, 2)


def test_sweep_without_trials_is_an_error(store, tmp_path):
    uri, client, _ = store
    experiment_id = client.get_experiment_by_name("sweeps").experiment_id
    empty = client.create_run(experiment_id, tags={"mdpo.sweep": "empty", "mdpo.role": "sweep",
                                                   "mdpo.metric": "eval/loss", "mdpo.mode": "min"}).info.run_id
    with pytest.raises(ValueError, match=f"sweep 'empty' \\(parent run {empty}\\) has no trial runs"):
        write_report(uri, empty, tmp_path)


def test_failed_trial_is_listed_but_never_best(store, tmp_path):
    """A trial that failed after its step-0 eval has a 'final' value that no training produced."""
    uri, client, _ = store
    experiment_id = client.get_experiment_by_name("sweeps").experiment_id
    parent = client.create_run(experiment_id, tags={"mdpo.sweep": "crash", "mdpo.role": "sweep",
                                                    "mdpo.search_keys": "loss.beta", "mdpo.metric": "eval/loss",
                                                    "mdpo.mode": "min"}).info.run_id
    for trial, loss, status in (("c_00000", 0.3, "FAILED"), ("c_00001", 0.6, "FINISHED")):
        run_id = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "mdpo.trial_id": trial,
                                                        "override.loss.beta": "0.1"}).info.run_id
        client.log_metric(run_id, "eval/loss", loss, step=0)
        client.set_terminated(run_id, status=status)
    report = write_report(uri, parent, tmp_path, attach=False)
    assert list(pd.read_csv(report.csv_path)["trial_id"]) == ["c_00000", "c_00001"]
    assert report.best_trial_id == "c_00001" and report.best_value == pytest.approx(0.6)
    assert report.plots == []  # no plotted metric was logged by a finished trial
