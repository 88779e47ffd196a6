"""System tier: two iterate rounds through Ray sampling actors, Ray Train and MLflow, stopped after round 0
and rerun: round 0 is skipped (its pairs are not resampled), round 1 trains from round 0's export. The run keeps
everything on object storage (an S3 server on 127.0.0.1), as on nodes without a shared file system: round 1's
samplers and workers load round 0's export and read its pairs from the bucket. Its prompts are conversations
(messages rendered by model.chat_template), so the rounds' pairs are too. The rounds train LoRA adapters with
`export.lora: adapter`: each round exports its merged model (the next round's start) and its adapter, and the run's
export is the rounds' adapters stacked into one over the initial model, which must compute the last round's policy.
Full fine-tuning rounds on text prompts into a local directory run end to end in tests/test_iterate_sweep.py."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import s3_server
from mlflow.tracking import MlflowClient
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mdpo_ray import storage
from mdpo_ray.config import load_config
from mdpo_ray.iterate import store
from mdpo_ray.tracking.mlflow_runs import ITERATE_ROUND_TAG, ROLE_TAG
from mdpo_ray.training.metrics import GLOSSARY

pytestmark = pytest.mark.slow


@pytest.fixture
def coin_verifier(tmp_path, monkeypatch):
    """A verifier that splits a random tiny model's samples about evenly (the built-in check would call them all
    wrong): a completion is correct when the CRC of its text is even."""
    (tmp_path / "coin_check.py").write_text(textwrap.dedent("""
        import zlib

        def even(prompt, completion, row):
            return zlib.crc32(completion.encode()) % 2 == 0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "coin_check:even"


BUCKET = "mdpo-iterate"
# The task's character tokenizer knows only its own characters: a user turn ends with ";", an answer with EOS.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                 "{% if m['role'] == 'user' %};{% else %}{{ eos_token }}{% endif %}{% endfor %}")


def _as_conversations(source, target):
    """The tiny task's text pairs as conversations: the prompt a user turn, each answer an assistant turn."""
    turn = lambda role, text: [{"role": role, "content": text}]
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    target.write_text("".join(json.dumps({"prompt": turn("user", row["prompt"]), "chosen": turn("assistant", row["chosen"]),
                                          "rejected": turn("assistant", row["rejected"])}) + "\n" for row in rows))
    return target


@pytest.fixture(scope="module")
def s3_ray(tmp_path_factory):
    """A versioned bucket on an S3 server, and a local Ray instance started after its settings are set, so its
    workers inherit them, as they inherit TMPDIR, where a node's copies of the bucket's models go. Shared by the
    module's tests: one Ray start-up, not one per test."""
    import ray

    from mdpo_ray import cluster

    ray.shutdown()
    with s3_server(BUCKET) as client, pytest.MonkeyPatch.context() as env:
        env.setenv("TMPDIR", str(tmp_path_factory.mktemp("node")))
        client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        cluster.init_ray(use_gpu=False)
        try:
            yield client
        finally:
            cluster.stop_ray()


def test_two_rounds_sample_with_actors_track_in_mlflow_and_resume_at_the_round(s3_ray, tiny_task, tiny_run_overrides,
                                                                              coin_verifier, tmp_path):
    from mdpo_ray import launch

    conversations = _as_conversations(tiny_task["train"], tmp_path / "conversations.jsonl")
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)

    def cfg(rounds):
        return load_config(None, [*tiny_run_overrides, f"data.train={conversations}",
                                  f"model.chat_template={tmp_path / 'chat.jinja'}",
                                  f"iterate.rounds={rounds}", f"iterate.verifier={coin_verifier}",
                                  "iterate.prompts_per_round=8", "iterate.samples_per_prompt=4",
                                  "optim.max_steps=2", "eval.max_generation_problems=4", f"output_dir=s3://{BUCKET}/runs",
                                  "model.lora.r=4", "model.lora.alpha=8", "export.lora=adapter",
                                  f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db"])

    def versions(key):  # how often an object was written (the bucket keeps every version)
        return len(client.list_object_versions(Bucket=BUCKET, Prefix=key).get("Versions", []))

    client = s3_ray
    first = launch.train(cfg(1))  # stopped after round 0, as a kill between the rounds would leave it
    round_0 = store.round_location(first.config.run_location, 0)
    files = [storage.join(round_0, name).split(f"{BUCKET}/", 1)[1]
             for name in (store.PAIRS_FILE, store.PAIRING_FILE, store.DONE_FILE)]
    assert [versions(key) for key in files] == [1, 1, 1]
    second = launch.train(cfg(2))
    assert [versions(key) for key in files] == [1, 1, 1]  # round 0 neither resampled nor retrained
    round_1 = store.load_done(store.round_location(second.config.run_location, 1))
    round_0_export = store.load_done(round_0)["export"]
    assert round_1["start_model"] == round_0_export and round_1["metrics"]["step"] == 2
    assert storage.is_file(storage.join(round_0_export, "model.safetensors"))  # merged: round 1's start
    # The run's export, rewritten by the rerun: one adapter of both rounds, over the model round 0 started from.
    assert first.export_dir == second.export_dir == storage.join(second.config.run_location, "export")
    assert first.export_dir.startswith(f"s3://{BUCKET}/runs/") and versions(
        storage.join(first.export_dir, "adapter_model.safetensors").split(f"{BUCKET}/", 1)[1]) == 2
    stacked = Path(storage.staged(second.export_dir))
    last_merged = storage.staged(round_1["export"])
    pairing = store.load_pairing(store.round_location(second.config.run_location, 1))
    config = json.loads((stacked / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)  # two rounds of r=4, alpha=8: the scale kept
    assert not (stacked / "model.safetensors").exists() and (stacked / "tokenizer_config.json").is_file()
    input_ids = torch.arange(24).reshape(2, 12) % 16  # within the character vocabulary
    with torch.no_grad():
        from_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_task["model"]),
                                                 stacked)(input_ids=input_ids).logits
        merged = AutoModelForCausalLM.from_pretrained(last_merged)(input_ids=input_ids).logits
        initial = AutoModelForCausalLM.from_pretrained(tiny_task["model"])(input_ids=input_ids).logits
    torch.testing.assert_close(from_adapter, merged, rtol=0, atol=1e-5)
    assert not torch.allclose(initial, merged, atol=1e-4)  # the rounds trained
    assert 0 < len(pairing.pairs) <= 8 and pairing.samples == 32
    assert all(pair["prompt"][0]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
               for pair in pairing.pairs)  # conversations in, conversations out

    client = MlflowClient(second.config.mlflow_uri)
    experiment = client.get_experiment_by_name(second.config.tracking.experiment).experiment_id
    parents = client.search_runs([experiment], f"tags.`{ROLE_TAG}` = 'iterate'")
    assert [p.info.run_id for p in parents] == [first.mlflow_run_id] == [second.mlflow_run_id]  # reopened
    assert parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{second.mlflow_run_id}'")
    assert sorted(c.data.tags[ITERATE_ROUND_TAG] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" and "loss" in c.data.metrics for c in children)
    history = client.get_metric_history(second.mlflow_run_id, "iterate/pairs")
    assert sorted((m.step, m.value) for m in history)[1] == (1, len(pairing.pairs))
    round_metrics = {m.name for m in GLOSSARY if m.kind == "round"}  # what docs/metrics.md lists, both ways
    assert set(parents[0].data.metrics) == round_metrics | {"eval/answer_accuracy"}
    for name in round_metrics:
        assert sorted(m.step for m in client.get_metric_history(second.mlflow_run_id, name)) == [0, 1], name
    # The parent's held-out accuracy at the steps trained so far: round 0's start, then each round's end.
    accuracy = {m.step: m.value for m in client.get_metric_history(second.mlflow_run_id, "eval/answer_accuracy")}
    assert sorted(accuracy) == [0, 2, 4] and accuracy[4] == round_1["metrics"]["eval/answer_accuracy"]



def test_a_lost_sampling_actor_is_restarted_and_samples_its_share_again_the_same(s3_ray, tiny_task, tiny_run_overrides):
    """A sampler's process killed while its share is asked of it: Ray restarts the actor (it loads the policy
    again) and runs the share on it, which gives what the lost one would have, since a share is seeded."""
    import os
    import signal

    import ray

    from mdpo_ray.launch_rounds import start_samplers

    cfg = load_config(None, [*tiny_run_overrides, "scaling.num_workers=1", "eval.max_new_tokens=6"])
    prompts = [json.loads(line)["prompt"] for line in tiny_task["train"].read_text().splitlines()[:3]]
    [actor] = start_samplers(cfg, str(tiny_task["model"]))
    pid = lambda: ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=120)
    sample = lambda: actor.sample.remote(prompts, n=2, temperature=1.0, seed=7)
    try:
        expected, first_pid = ray.get(sample(), timeout=120), pid()
        pending = sample()
        os.kill(first_pid, signal.SIGKILL)
        assert ray.get(pending, timeout=120) == expected
        assert pid() != first_pid  # a new process: the actor was restarted, not the call answered before the kill
    finally:
        ray.kill(actor)
    assert len(expected) == 3 and all(len(completions) == 2 for completions in expected)
