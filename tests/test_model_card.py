"""Fast tier: the exported model's card names Hub repositories in its front matter only when they are Hub
repositories, and says what it does not know. (A whole run's card: test_train_loop, test_lora.)"""

from huggingface_hub import ModelCard

from mdpo_ray.config import validate_config
from mdpo_ray.training.model_card import RunFacts, write_model_card


def _facts(**changes):
    facts = dict(steps=30, data_counts=[("train", "trl-lib/ultrafeedback_binarized", dict(
        rows=100, kept=97, bad_rows=1, prompt_too_long=2, truncated=5))], n_train_pairs=95, n_eval_pairs=2,
        n_problems=0)
    return RunFacts(**(facts | changes))


def test_hub_model_and_dataset_go_to_the_front_matter_and_unknowns_are_said(tmp_path):
    cfg = validate_config({"name": "qwen-dpo", "model": {"name_or_path": "Qwen/Qwen2.5-0.5B"},
                           "data": {"train": "trl-lib/ultrafeedback_binarized", "eval_fraction": 0.02},
                           "loss": {"name": "dpop", "beta": 0.05, "dpop_lambda": 20}}, base=tmp_path)
    path = write_model_card(tmp_path, cfg, _facts(stop_reason="3 non-finite steps (stop.max_nonfinite_steps)"))
    card = ModelCard.load(path)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B" and card.data.datasets == ["trl-lib/ultrafeedback_binarized"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    text = card.text
    assert "| loss | `dpop` |" in text and "β (`loss.beta`) = 0.05, λ (`loss.dpop_lambda`) = 20 |" in text
    assert "| steps | 30 of `optim.max_steps` = 100, stopped early: 3 non-finite steps" in text
    assert "| train | `trl-lib/ultrafeedback_binarized` | 100 | 97 | 1 | 2 | 5 |" in text
    assert "held out from the training data, `data.eval_fraction` = 0.02" in text
    assert "No held-out evaluation in this session" in text
    assert "Not tracked: MLflow was unreachable when the run started." in text


def test_local_files_stay_out_of_the_front_matter(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    cfg = validate_config({"model": {"name_or_path": "model"}, "data": {"train": "pairs.jsonl"}}, base=tmp_path)
    card = ModelCard.load(write_model_card(tmp_path, cfg, _facts(mlflow_run_id="abc")))
    assert card.data.base_model is None and card.data.datasets is None
    assert f"Preference-trained from `{tmp_path / 'model'}`" in card.text
