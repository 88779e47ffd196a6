"""The training loop in-process on a one-rank FSDP2 group (the same code path Ray workers run)."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mdpo_ray.config import load_config
from mdpo_ray.training import distributed, reference, train_loop
from mdpo_ray.training.schedule import batch_indices
from mdpo_ray.training.train_loop import Worker, train


class Recorder:
    """Stands in for Ray's report and MLflow: keeps every (metrics, step) and checkpoint dir it is given."""

    def __init__(self, keep_checkpoints_in: Path | None = None):
        self.logged: dict[int, dict[str, float]] = {}
        self.reports: list[dict[str, float]] = []
        self.checkpoints: list[Path] = []
        self.keep = keep_checkpoints_in

        self.tags: dict[str, str] = {}
        self.logged_models: list = []

    def log(self, metrics, step):
        self.logged.setdefault(step, {}).update(metrics)

    def tag(self, key, value):
        self.tags[key] = value

    def log_model(self, export_dir):
        self.logged_models.append(export_dir)

    def report(self, metrics, checkpoint_dir, step):
        self.reports.append(metrics)
        if checkpoint_dir is not None and self.keep is not None:
            import shutil

            target = self.keep / f"checkpoint_{step:06d}"
            shutil.copytree(checkpoint_dir, target)
            self.checkpoints.append(target)


def _run(overrides, recorder=None, restore_dir=None, mlflow_run_id=None):
    cfg = load_config(None, [*overrides, "scaling.num_workers=1"])
    recorder = recorder or Recorder()
    train(cfg, Worker(report=recorder.report, sink=recorder, restore_dir=restore_dir, mlflow_run_id=mlflow_run_id))
    return cfg, recorder


def _params(model_dir):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


def test_step_zero_is_ln2_and_every_policy_tensor_changes_but_no_reference_tensor(tiny_task, tiny_run_overrides,
                                                                                   monkeypatch):
    frozen = []
    original_init = reference.ResidentReference.__init__

    def capture(self, model, **kwargs):
        frozen.append(model)
        original_init(self, model, **kwargs)

    monkeypatch.setattr(reference.ResidentReference, "__init__", capture)
    before = _params(tiny_task["model"])
    # A tracking URI with credentials: the model card must name the server without them.
    cfg, rec = _run([*tiny_run_overrides, "tracking.mlflow_uri=http://alice:s3cret@mlflow.example:5000",
                     "tracking.log_model=true"], mlflow_run_id="0123abcd")
    assert rec.logged_models == [cfg.run_dir / "export"]  # the export with its card, before it is uploaded

    # Policy == reference at step 1: Δw = Δl = 0, so every pair's loss is ln 2 (MinorDPO == DPO there).
    # The curves' step-0 point is that forward (before the first update), beside the step-0 eval.
    for step in (0, 1):
        assert rec.logged[step]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert rec.logged[step]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert rec.logged[0]["delta_chosen/p90"] == pytest.approx(0, abs=1e-6) and "grad_norm" not in rec.logged[0]
    assert set(rec.logged) == {0, 1, 2, 3, 4}
    for key in ("eval/answer_accuracy", "eval/rewards/accuracies", "eval/logits/chosen", "logits/rejected"):
        assert key in rec.logged[0]
    assert rec.tags["data/train_rows"].isdigit()  # data counts are run tags: one number is not a curve
    assert "eval/answer_accuracy" in rec.logged[4]
    from mdpo_ray.training.metrics import GLOSSARY, METRIC_NAMES

    # What is logged is exactly what docs/metrics.md lists (generated from GLOSSARY), both ways.
    logged_names = {k for step in rec.logged.values() for k in step}
    assert logged_names == METRIC_NAMES, logged_names ^ METRIC_NAMES  # the names sweeps may optimise
    data_tags = {t for t in rec.tags if t.startswith("data/")}
    assert data_tags == {m.name.replace("{train,eval}", split) for m in GLOSSARY if m.kind == "data_tag"
                         for split in ("train", "eval")}

    assert rec.tags["mdpo.export_path"] == str(cfg.run_dir / "export")  # the model, from the run
    assert rec.tags["mdpo.export_uri"] == (cfg.run_dir / "export").resolve().as_uri()
    after = _params(cfg.run_dir / "export")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"policy tensors that did not train: {unchanged}"
    ref_state = distributed.full_state_dict(frozen[0])
    assert all(torch.equal(ref_state[k], before[k]) for k in before), "the reference model changed"
    tokenizer = AutoTokenizer.from_pretrained(cfg.run_dir / "export")
    assert tokenizer.decode(tokenizer("Q: 1+2= A:")["input_ids"], skip_special_tokens=True) == "Q: 1+2= A:"
    _check_model_card(cfg, rec, tiny_task)


def _check_model_card(cfg, rec, tiny_task):
    """The export explains itself: a Hub-readable card with this run's numbers."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(cfg.run_dir / "export" / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == ["mdpo-ray", "minor-dpo", "dpo"]
    assert card.data.base_model is None  # a local directory is no Hub repository; the text names it
    text = card.text
    assert f"from `{tiny_task['model']}`" in text
    assert "β (`loss.beta`) = 0.1, τ (`loss.reject_threshold`) = 0, w (`loss.reject_weight`) = 1" in text
    assert "| steps | 4 of `optim.max_steps` = 4 |" in text and "(32 pairs seen)" in text
    data = {cells[1]: cells[2:] for cells in _table_rows(text) if cells[1] in ("train", "eval")}
    assert data["train"][0] == f"`{tiny_task['train']}`" and data["eval"][0] == f"`{tiny_task['eval']}`"
    for split in ("train", "eval"):
        assert data[split][1:] == [rec.tags[f"data/{split}_{count}"] for count in
                                   ("rows", "kept", "bad_rows", "prompt_too_long", "truncated")]
    results = {cells[1].strip("`"): cells[2:] for cells in _table_rows(text) if cells[1].startswith("`eval/")}
    for name in ("eval/answer_accuracy", "eval/rewards/accuracies", "eval/delta_chosen/mean", "eval/loss"):
        before, after = (float(value) for value in results[name])
        assert before == pytest.approx(rec.logged[0][name], rel=1e-3, abs=1e-6)
        assert after == pytest.approx(rec.logged[4][name], rel=1e-3, abs=1e-6)
    assert "MLflow run `0123abcd` in experiment `mdpo-ray` at `http://***REDACTED***@mlflow.example:5000`" in text
    assert "s3cret" not in (cfg.run_dir / "export" / "README.md").read_text()
    from mdpo_ray import __version__

    assert f"with mdpo-ray {__version__}." in text


def _table_rows(markdown):
    return [[cell.strip() for cell in line.split("|")[:-1]] for line in markdown.splitlines() if line.startswith("| ")]


def test_precompute_gives_the_same_losses_as_a_resident_reference(tiny_run_overrides):
    _, resident = _run(tiny_run_overrides)
    _, precomputed = _run([*tiny_run_overrides, "reference=precompute", "name=precompute"])
    for step in (1, 2, 3, 4):
        for key in ("loss", "logps/ref_chosen", "logps/ref_rejected", "rewards/margins"):
            assert precomputed.logged[step][key] == pytest.approx(resident.logged[step][key], rel=1e-4, abs=1e-5)
    assert precomputed.logged[4]["eval/loss"] == pytest.approx(resident.logged[4]["eval/loss"], rel=1e-4)


def test_nll_weight_adds_the_chosen_token_mean_nll_to_training_and_held_out_losses(tiny_run_overrides):
    """At step 0 the policy is the reference, so MinorDPO's loss is ln 2 for every pair; with length-averaged
    log-probs the chosen answer's token-mean NLL is −logps/chosen, so with λ = 0.5 the logged loss is
    ln 2 + 0.5·(−logps/chosen), on the training batch and on the held-out pairs alike."""
    _, run = _run([*tiny_run_overrides, "loss.average_log_prob=true", "loss.nll_weight=0.5", "optim.max_steps=1"])
    for prefix in ("", "eval/"):
        start = run.logged[0]
        assert start[prefix + "loss"] == pytest.approx(math.log(2) - 0.5 * start[prefix + "logps/chosen"], rel=1e-5)


def test_packed_and_length_grouped_steps_give_the_padded_losses(tiny_run_overrides):
    """data.padding_free and data.group_by_length change how a step's pairs are laid out, not which pairs it
    trains on: every logged loss and log-prob matches the padded run's, with a resident and a precomputed
    reference, and a packed policy's step 0 against its resident reference is still exactly Δw = Δl = 0."""
    micro = [*tiny_run_overrides, "optim.micro_batch_size=2"]
    _, padded = _run([*micro, "data.padding_free=false"])
    runs = {"packed": ["data.padding_free=true"], "grouped": ["data.group_by_length=true", "data.padding_free=false"],
            "packed_precompute": ["data.padding_free=true", "reference=precompute"]}
    for name, overrides in runs.items():
        _, run = _run([*micro, *overrides, f"name={name}"])
        for step in (1, 2, 3, 4):
            for key in ("loss", "logps/chosen", "logps/rejected", "logps/ref_chosen", "rewards/margins"):
                assert run.logged[step][key] == pytest.approx(padded.logged[step][key], rel=1e-5, abs=1e-6), (name, key)
        assert run.logged[4]["eval/loss"] == pytest.approx(padded.logged[4]["eval/loss"], rel=1e-5), name
        if name == "packed":
            assert run.logged[0]["delta_chosen/mean"] == 0 and run.logged[0]["delta_rejected/mean"] == 0


def test_resume_from_a_checkpoint_continues_the_same_trajectory(tiny_run_overrides, tmp_path):
    overrides = [*tiny_run_overrides, "optim.warmup_steps=3"]  # steps 1-3 warm up: the schedule must carry over
    _, straight = _run(overrides)
    keep = tmp_path / "kept"
    keep.mkdir()
    first = Recorder(keep_checkpoints_in=keep)
    _run([*overrides, "name=interrupted", "optim.max_steps=2"], first)
    state_file = first.checkpoints[-1] / train_loop.STATE_FILE  # as written before the LR was a function of the step
    state_file.write_text(json.dumps(json.loads(state_file.read_text()) | {"scheduler": {"last_epoch": 2}}))
    _, resumed = _run([*overrides, "name=interrupted"], Recorder(), restore_dir=first.checkpoints[-1])
    assert 1 not in resumed.logged and 0 not in resumed.logged  # no re-evaluation, no replayed steps
    for step in (3, 4):
        assert resumed.logged[step]["lr"] == straight.logged[step]["lr"]
        assert resumed.logged[step]["loss"] == pytest.approx(straight.logged[step]["loss"], rel=1e-5)
    assert [straight.logged[step]["lr"] for step in (1, 3, 4)] == pytest.approx([0.25e-2, 0.75e-2, 1e-2])


def test_the_learning_rate_is_a_function_of_the_step_logged_with_the_step_it_drove():
    """Warm-up over 3 steps: step s (1-based) gets lr * s / 4 while s <= 3. Then max_steps - warmup = 4
    steps of schedule, step s at progress (s - 4) / 4: linear 1 - progress, cosine (1 + cos(pi * progress)) / 2."""
    def lrs(schedule):
        cfg = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=3", "optim.max_steps=7",
                                 f"optim.schedule={schedule}"]).optim
        return [train_loop.lr_at(cfg, step) for step in range(1, 8)]

    warmup = [0.25, 0.5, 0.75]
    assert lrs("constant") == pytest.approx([*warmup, 1.0, 1.0, 1.0, 1.0])
    assert lrs("linear") == pytest.approx([*warmup, 1.0, 0.75, 0.5, 0.25])
    assert lrs("cosine") == pytest.approx([*warmup, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                           (1 + math.cos(3 * math.pi / 4)) / 2])


@pytest.mark.filterwarnings("error::UserWarning")  # no warning that the schedule stepped without the optimizer
def test_nonfinite_steps_are_skipped_then_fail_with_advice(tiny_run_overrides, monkeypatch):
    monkeypatch.setattr(train_loop, "LOSSES", {"minor_dpo": lambda *a, **k: _nan_output(a)})
    with pytest.raises(train_loop.NonFiniteError, match="consecutive non-finite steps ending at step 2.*optim.lr"):
        _run([*tiny_run_overrides, "optim.max_consecutive_nonfinite=2"])


def _nan_output(logps):
    from mdpo_ray.training.losses import LossOutput

    nan = logps[0] * float("nan")
    return LossOutput(losses=nan, chosen_rewards=nan.detach(), rejected_rewards=nan.detach())


def test_batches_depend_only_on_step_and_split_evenly_over_ranks():
    one = [batch_indices(s, n=10, batch_size=4, seed=3, rank=0, world=1) for s in range(1, 6)]
    two = [batch_indices(s, n=10, batch_size=4, seed=3, rank=r, world=2) for s in range(1, 6) for r in (0, 1)]
    assert [i for b in one for i in b] == [i for b in two for i in b]
    first_epoch = [i for b in one for i in b][:10]
    assert sorted(first_epoch) == list(range(10))  # an epoch is a permutation


def test_a_cached_reference_table_is_reused_without_loading_the_reference(tiny_run_overrides, monkeypatch):
    _run([*tiny_run_overrides, "reference=precompute", "name=first", "optim.max_steps=1"])
    loads = []
    original = train_loop.load_causal_lm
    monkeypatch.setattr(train_loop, "load_causal_lm", lambda cfg, trainable, **kw: loads.append(trainable) or
                        original(cfg, trainable=trainable, **kw))
    _run([*tiny_run_overrides, "reference=precompute", "name=second", "optim.max_steps=1"])
    assert loads == [True], "only the policy is loaded when the reference table is cached"


def test_a_precomputed_reference_is_freed_before_training(tiny_run_overrides, monkeypatch):
    """`precompute` holds one model while training: the frozen one is gone once its tables are made."""
    import gc
    import weakref

    frozen, alive_after_build = [], []
    load, build = reference.load_causal_lm, reference.build
    monkeypatch.setattr(reference, "load_causal_lm", lambda cfg, trainable, **kw: frozen.append(
        weakref.ref(model := load(cfg, trainable=trainable, **kw))) or model)

    def checked_build(*args, **kwargs):
        out = build(*args, **kwargs)
        alive_after_build.append([ref() is not None for ref in frozen])
        return out

    monkeypatch.setattr(reference, "build", checked_build)
    gc.disable()  # only the collection the code asks for, not one the allocator happens to trigger
    try:
        _run([*tiny_run_overrides, "reference=precompute", "optim.max_steps=1"])
    finally:
        gc.enable()
    assert alive_after_build == [[False]]


def test_stop_config_ends_an_unstable_run_early_and_says_why(tiny_run_overrides, monkeypatch):
    from mdpo_ray.training.losses import LossOutput

    def push_chosen_down(pc, pr, rc, rr, **knobs):  # a deliberately harmful loss: lowers log p(chosen)
        return LossOutput(losses=pc, chosen_rewards=(pc - rc).detach(), rejected_rewards=(pr - rr).detach())

    monkeypatch.setattr(train_loop, "LOSSES", {"minor_dpo": push_chosen_down})
    cfg, rec = _run([*tiny_run_overrides, "optim.max_steps=50", "stop.max_chosen_drop=0.5"])
    last = max(rec.logged)
    assert 1 < last < 50
    assert rec.logged[last]["delta_chosen/mean"] < -0.5
    assert "stop.max_chosen_drop" in rec.tags["mdpo.stop_reason"]
    assert "eval/answer_accuracy" in rec.logged[last]  # a stopped run is still evaluated and exported
    assert (cfg.run_dir / "export" / "config.json").is_file()


@pytest.mark.parametrize("reference_mode", ["resident", "precompute"])
def test_a_bf16_mixed_precision_run_trains_evaluates_and_exports_fp32_weights(tiny_task, tiny_run_overrides,
                                                                              monkeypatch, reference_mode):
    """The GPU recipe's precision on CPU (the config allows bf16 only with use_gpu, so the policy is
    swapped in): the reference (resident, or its log-prob table), the loss, greedy decoding and the
    export all meet bf16 params."""
    tiny_run_overrides = [*tiny_run_overrides, f"reference={reference_mode}"]
    _, fp32 = _run(tiny_run_overrides)
    ours = distributed.mixed_precision
    monkeypatch.setattr(distributed, "mixed_precision", lambda mode, device: ours("bf16", device))
    frozen, keep = [], reference.ResidentReference.__init__
    monkeypatch.setattr(reference.ResidentReference, "__init__",
                        lambda self, model, **kwargs: frozen.append(model) or keep(self, model, **kwargs))
    # The same output_dir, and the configured precision is still auto: the fp32 run's cached reference tables
    # and start-of-run decoding must not be reused, as they are keyed by the precision that ran.
    cfg, bf16 = _run([*tiny_run_overrides, "name=bf16"])
    cached = [p.name.startswith("generation-") for p in (Path(cfg.output_dir) / "reference_logps").glob("*.pt")]
    assert sorted(cached) == [False] * (4 if reference_mode == "precompute" else 0) + [True] * 2  # (train, eval) x 2
    assert bf16.tags.get("mdpo.reference_cache") == (None if reference_mode == "resident" else "computed,computed")

    assert bf16.logged[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference, both in bf16
    if reference_mode == "resident":  # the same forward on the same bf16 values: exactly 0, not ~1e-7
        first = bf16.logged[1]
        assert first["delta_chosen/mean"] == first["delta_rejected/mean"] == 0.0
        assert first["stability/chosen_below_ref_frac"] == first["stability/penalty_off_frac"] == 0.0
        assert {p.dtype for p in frozen[-1].parameters()} == {torch.bfloat16}  # no fp32 copy of a frozen model
    assert bf16.logged[1]["logps/chosen"] == pytest.approx(fp32.logged[1]["logps/chosen"], rel=1e-2)
    assert bf16.logged[1]["logps/chosen"] != pytest.approx(fp32.logged[1]["logps/chosen"], rel=1e-6)  # it was bf16
    assert all(math.isfinite(bf16.logged[step]["loss"]) for step in (1, 2, 3, 4))
    assert "eval/answer_accuracy" in bf16.logged[4]
    before, after = _params(tiny_task["model"]), _params(cfg.run_dir / "export")
    assert all(t.dtype == torch.float32 for t in after.values())  # the fp32 master weights, not bf16 copies
    assert not [k for k in before if torch.equal(before[k], after[k])]


def test_each_start_tags_the_node_of_every_rank_and_outside_ray_nothing(capsys):
    recorder = Recorder()
    train_loop._record_placement(Worker(sink=recorder, node="f00d"), print)
    assert recorder.tags == {"mdpo.worker_nodes": "f00d:0"}  # "<node>:<ranks>;...", one rank here
    assert "1 worker(s) on 1 node(s): f00d:0" in capsys.readouterr().out
    recorder = Recorder()
    train_loop._record_placement(Worker(sink=recorder), print)
    assert recorder.tags == {}
