"""The results page's verdicts: computed from seed means by stated rules, so they can come out either way."""

import pandas as pd

from mdpo_ray.reports.claims import BETA, DL, DW, KIND, LOSS, LR, claims
from mdpo_ray.reports.results import _tables, _variant, shown_store

LRS = (1e-5, 1e-4)


def _frame(minor_acc, dpo_acc, minor_dw=0.5, dpo_dw=-5.0, minor_dl=-2.0, dpo_dl=-20.0, sft_acc=60.0) -> pd.DataFrame:
    """Two seeds per cell, reference at 50 points; *_acc give the accuracy at each lr in LRS."""
    rows = []
    for loss, beta, accs, dw, dl in (("minor_dpo", 0.1, minor_acc, minor_dw, minor_dl),
                                     ("dpo", 0.1, dpo_acc, dpo_dw, dpo_dl),
                                     ("sft", float("nan"), (sft_acc,) * len(LRS), 1.0, 0.5)):
        for lr, acc in zip(LRS, accs):
            for seed, wobble in ((0, -1.0), (1, 1.0)):
                rows.append({KIND: "near_miss", LOSS: loss, BETA: beta, LR: lr, "seed": seed,
                             "variant": _variant(loss, beta), "acc_points": acc + wobble, "reference_points": 50.0,
                             "reward_acc_points": 90.0, DW: dw, DL: dl})
    return pd.DataFrame(rows)


def test_minor_dpo_holding_where_dpo_collapses_reads_held():
    text = "\n".join(claims(_frame(minor_acc=(60, 58), dpo_acc=(52, 20))))
    assert "**The rejected answer is not driven far below the reference** — held" in text
    assert "**The chosen answer's likelihood is not dragged down** — held" in text
    assert "**Accuracy holds where DPO degrades** — held" in text
    assert "near_miss β=0.1 lr=0.0001: 58.0 vs DPO 20.0 (reference 50.0)" in text
    assert "**Up to +5 accuracy points over DPO** — held" in text and "near_miss β=0.1: +8.0" in text
    assert "exceeds SFT's" in text and "did not hold" in text.split("5. ")[1]  # 60 is not above SFT's 60


def test_the_same_rules_report_a_failure():
    text = "\n".join(claims(_frame(minor_acc=(30, 10), dpo_acc=(40, 20), minor_dw=-3.0, minor_dl=-30.0)))
    assert "not driven far below the reference** — did not hold" in text
    assert "not dragged down** — did not hold" in text
    assert "Accuracy holds where DPO degrades** — did not hold" in text
    assert "+5 accuracy points over DPO** — did not hold" in text


def test_tables_show_mean_and_std_over_seeds():
    text = "\n".join(_tables(_frame(minor_acc=(60, 58), dpo_acc=(52, 20))))
    assert "### rejected answers: near_miss (SFT reference: 50.0 points)" in text
    assert "| minor_dpo β=0.1 | 60.0 ± 1.4 | 58.0 ± 1.4 |" in text
    assert "| sft | 60.0 ± 1.4 | 60.0 ± 1.4 |" in text
    assert "| dpo β=0.1 | -5.00 ± 0.00 | -5.00 ± 0.00 |" in text  # Δw


def test_the_page_names_a_store_under_the_working_directory_by_its_relative_path(tmp_path, monkeypatch):
    """A checked-in results page must not name a directory of the machine that generated it."""
    monkeypatch.chdir(tmp_path)
    assert shown_store(f"sqlite:///{tmp_path}/mdpo_runs/mlflow.db") == "sqlite:///mdpo_runs/mlflow.db"
    elsewhere = f"sqlite:///{tmp_path.parent}/other/mlflow.db"
    assert shown_store(elsewhere) == elsewhere  # nothing shorter is true
    assert "secret" not in shown_store("http://user:secret@mlflow.example:5000")
