"""The iterate experiment's verdict rule and recipe names, on hand-made final accuracies (no MLflow, no Ray), and
the results page keeping each sweep's section."""

import pandas as pd
import pytest

from mdpo_ray.reports.iterative import RFT, SFT, compare, recipe, verdicts
from mdpo_ray.reports.results import _SECTION, replace_section

MINOR, DPO = "iterative MinorDPO", "iterative DPO"


@pytest.mark.parametrize("loss, nll, rounds, name", [
    ("minor_dpo", 0.0, 3, MINOR), ("dpo", 1.0, 3, "iterative DPO + NLL 1"), ("sft", 0.0, 3, RFT),
    ("sft", 0.0, 0, SFT), ("minor_dpo", 0.0, 0, "MinorDPO (no rounds)"), ("ipo", 0.0, 2, "iterative ipo"),
])
def test_a_trials_recipe_follows_from_its_loss_and_rounds(loss, nll, rounds, name):
    assert recipe(loss, nll, rounds) == name


def _finals(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns, index=pd.Index([0, 1, 2], name="seed"))


def test_beats_needs_every_seeds_paired_difference_above_zero():
    finals = _finals(**{MINOR: [60.0, 62.0, 70.0], SFT: [59.0, 61.5, 50.0], RFT: [61.0, 61.0, 50.0],
                        DPO: [70.0, 70.0, 71.0]})
    verdict, figures = compare(finals, MINOR, SFT)
    assert verdict == "beats" and "+1.0" in figures and "+0.5" in figures and "3 seed(s)" in figures
    # A higher mean is not enough: seed 0 loses by 1 point.
    assert compare(finals, MINOR, RFT)[0] == "not shown"
    assert compare(finals, MINOR, DPO)[0] == "is beaten by"
    assert compare(finals.drop(columns=[RFT]), MINOR, RFT) == ("not tested", f"no finished {RFT} trials")


def test_only_seeds_that_ran_both_recipes_are_paired():
    finals = _finals(**{MINOR: [60.0, None, 70.0], SFT: [59.0, 99.0, None]})
    verdict, figures = compare(finals, MINOR, SFT)
    assert verdict == "beats" and "1 seed(s)" in figures and "seed 0: +1.0" in figures


def test_the_verdicts_ask_issue_25s_three_questions_for_each_minor_dpo_recipe():
    finals = _finals(**{MINOR: [60.0, 62.0, 70.0], f"{MINOR} + NLL 1": [65.0, 66.0, 67.0], SFT: [59.0, 61.5, 50.0],
                        DPO: [50.0, 50.0, 50.0]})
    text = "\n".join(verdicts(finals))
    for needle in ("Iterative MinorDPO beats plain SFT", "Iterative MinorDPO beats RFT", "MinorDPO vs DPO",
                   f"**{MINOR} beats {SFT}**", f"**{MINOR} vs {RFT}: not tested**",
                   f"**{MINOR} beats {DPO}**", f"**{MINOR} + NLL 1 vs iterative DPO + NLL 1: not tested**",
                   "every one of those seeds"):
        assert needle in text, needle
    assert "nothing to compare" in "\n".join(verdicts(_finals(**{SFT: [1.0, 2.0, 3.0]})))


def test_a_section_is_replaced_in_place_and_the_rest_of_the_page_kept(tmp_path):
    page = tmp_path / "results.md"
    replace_section(page, "iterative", "first\n")
    assert page.read_text() == "<!-- section iterative begin -->\nfirst\n<!-- section iterative end -->\n"
    page.write_text("# lr page\n\n" + page.read_text() + "\ntail\n")
    replace_section(page, "iterative", "second\n")
    replace_section(page, "other", "third\n")
    text = page.read_text()
    assert text.startswith("# lr page\n\n<!-- section iterative begin -->\nsecond\n") and "first" not in text
    assert "\ntail\n" in text and text.endswith("<!-- section other begin -->\nthird\n<!-- section other end -->\n")
    assert [m.group(1) for m in _SECTION.finditer(text)] == ["iterative", "other"]  # what the lr page keeps


class _Client:
    """MlflowClient.get_metric_history over {run_id: {step: value}}."""

    def __init__(self, histories):
        self.histories = histories

    def get_metric_history(self, run_id, key):
        from types import SimpleNamespace

        assert key == "eval/answer_accuracy"
        return [SimpleNamespace(step=step, value=value) for step, value in self.histories[run_id].items()]


def _run(run_id, loss, rounds, max_steps, seed, nll=0.0, status="FINISHED"):
    from types import SimpleNamespace

    params = {"loss.name": loss, "loss.nll_weight": str(nll), "iterate.rounds": str(rounds),
              "optim.max_steps": str(max_steps), "seed": str(seed)}
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status), data=SimpleNamespace(params=params))


def test_rounds_are_read_at_the_steps_each_round_ends_for_iterate_and_single_runs():
    from mdpo_ray.reports.iterative import accuracy_frame, final_accuracy

    client = _Client({"it": {0: 0.5, 25: 0.6, 50: 0.62, 75: 0.7}, "sft": {0: 0.5, 10: 0.9, 25: 0.55, 50: 0.6, 75: 0.65},
                      "dead": {0: 0.5}})
    runs = [_run("it", "minor_dpo", 3, 25, 0), _run("sft", "sft", 0, 75, 0),
            _run("dead", "sft", 3, 25, 0, status="FAILED")]
    frame, per_round = accuracy_frame(client, runs)
    assert per_round == 25
    assert sorted(zip(frame["recipe"], frame["round"], frame["acc_points"].round(1))) == [
        (SFT, 0, 50.0), (SFT, 1, 55.0), (SFT, 2, 60.0), (SFT, 3, 65.0),  # step 10 is no round's end
        (MINOR, 0, 50.0), (MINOR, 1, 60.0), (MINOR, 2, 62.0), (MINOR, 3, 70.0)]  # the FAILED trial is left out
    finals = final_accuracy(frame)
    assert finals.loc[0, MINOR] == pytest.approx(70.0) and finals.loc[0, SFT] == pytest.approx(65.0)


def test_the_report_refuses_trials_it_cannot_line_up():
    from mdpo_ray.reports.iterative import accuracy_frame

    client = _Client({})
    with pytest.raises(ValueError, match="share one optim.max_steps"):
        accuracy_frame(client, [_run("a", "dpo", 3, 25, 0), _run("b", "minor_dpo", 3, 30, 0)])
    with pytest.raises(ValueError, match="both iterative DPO with seed 1"):
        accuracy_frame(client, [_run("a", "dpo", 3, 25, 1), _run("b", "dpo", 3, 25, 1)])
