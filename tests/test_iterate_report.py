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
