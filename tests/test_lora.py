"""LoRA (model.lora.r > 0): adapters only train, the reference is the policy with them off, checkpoints
hold the adapters, and both exports load back with the standard calls."""

import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mdpo_ray.config import ConfigError, LoraConfig, ModelConfig, load_config
from mdpo_ray.training import distributed, lora, reference
from mdpo_ray.training.train_loop import Worker, train

LORA = ["model.lora.r=4", "model.lora.alpha=8"]
NO_DECODING = "data.generation_eval=null"  # greedy decoding through the peft model is tested once, not in every run


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_target_modules_that_name_no_linear_layer_fail_with_the_models_linear_names(tiny_task):
    cfg = ModelConfig(name_or_path=str(tiny_task["model"]), lora=LoraConfig(r=4, target_modules=["q_proj", "qkv"]))
    with pytest.raises(ConfigError) as info:
        lora.check_config(cfg)  # the architecture alone, on the meta device
    assert "['qkv']" in str(info.value)
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in str(info.value)
    lora.check_config(cfg.model_copy(update={"lora": LoraConfig(r=4, target_modules=["self_attn.q_proj"])}))


def test_a_bad_target_module_exits_2_before_ray_starts(tiny_run_overrides, capsys):
    import ray

    from mdpo_ray.cli import main

    assert main(["train", *[f"--set={o}" for o in tiny_run_overrides], "--set=model.lora.r=4",
                 "--set=model.lora.target_modules=[q_proj, c_attn]"]) == 2
    assert "model.lora.target_modules: ['c_attn'] names no linear layer" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_wrapping_makes_only_the_adapters_trainable_and_keeps_what_sharding_and_logps_read():
    model = _tiny_llama()
    model.requires_grad_(True)  # as load_causal_lm(trainable=True) leaves it
    head = model.get_output_embeddings()
    wrapped = lora.wrap(model, LoraConfig(r=4))
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    # all-linear: 7 projections per block (q, k, v, o, gate, up, down) x 2 blocks, an A and a B each; not the head
    assert len(trainable) == 28 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert wrapped._no_split_modules == model._no_split_modules  # shard_model finds the decoder blocks
    assert wrapped.get_output_embeddings() is head  # logps.py feeds the head only the completion positions
    assert all(not p.any() for n, p in wrapped.named_parameters() if ".lora_B." in n)  # B = 0: a no-op at init
    two = lora.wrap(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert sum(p.requires_grad for p in two.parameters()) == 8


def test_adapters_off_computes_the_base_model_and_keeps_the_trainable_flags():
    from mdpo_ray.data.pairs import collate_pairs
    from mdpo_ray.training.logps import concatenated_logps, device_batch

    distributed.ensure_process_group()
    base = _tiny_llama()
    with torch.no_grad():
        expected = base(input_ids=torch.arange(12).reshape(2, 6)).logits
    policy = lora.wrap(_tiny_llama().requires_grad_(True), LoraConfig(r=4))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".lora_B." in name:
                param.normal_()  # the adapters now change the outputs
    cpu = torch.device("cpu")
    distributed.shard_model(policy, distributed.make_mesh(cpu), distributed.mixed_precision("fp32", cpu))
    flags = [p.requires_grad for p in policy.parameters()]
    with torch.no_grad(), lora.adapters_off(policy):
        off = policy(input_ids=torch.arange(12).reshape(2, 6)).logits
    torch.testing.assert_close(off, expected, rtol=0, atol=1e-6)
    assert [p.requires_grad for p in policy.parameters()] == flags
    with torch.no_grad():
        assert not torch.allclose(policy(input_ids=torch.arange(12).reshape(2, 6)).logits, expected, atol=1e-3)

    rows = [{"prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5], "rejected_input_ids": [6, 7, 8]}] * 2
    batch = device_batch(collate_pairs(rows, pad_token_id=0), cpu)
    reference_logps = reference.ResidentReference(policy, pad_token_id=0, average=False, adapters_off=True)
    base_logps = concatenated_logps(base, batch)
    for got, want in zip(reference_logps.logps(batch, [0, 1]), base_logps, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_first_forward_with_the_adapters_off_leaves_the_bf16_backward_working():
    """FSDP2 fixes each block's gradient dtypes at its first forward, from the parameters' requires_grad:
    with peft's disable_adapter() alone, a block whose only trainable parameters are adapters would look
    frozen, and its bf16 gradients would then meet fp32 master weights in backward."""
    distributed.ensure_process_group()
    policy = lora.wrap(_tiny_llama().requires_grad_(True), LoraConfig(r=4))
    cpu = torch.device("cpu")
    distributed.shard_model(policy, distributed.make_mesh(cpu), distributed.mixed_precision("bf16", cpu))
    input_ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad(), lora.adapters_off(policy):
        policy(input_ids=input_ids)
    policy(input_ids=input_ids).logits.float().square().mean().backward()
    grads = [p.grad for n, p in policy.named_parameters() if ".lora_B." in n]
    assert len(grads) == 14 and all(g is not None and g.dtype == torch.float32 for g in grads)


class _Recorder:
    """Stands in for Ray's report and MLflow: keeps the logged metrics and copies of the checkpoints."""

    def __init__(self, keep=None):
        self.logged, self.checkpoints, self.keep = {}, [], keep

    def log(self, metrics, step):
        self.logged.setdefault(step, {}).update(metrics)

    def tag(self, key, value):
        pass

    def report(self, metrics, checkpoint_dir, step):
        if checkpoint_dir is not None and self.keep is not None:
            import shutil

            self.checkpoints.append(shutil.copytree(checkpoint_dir, self.keep / f"checkpoint_{step:06d}"))


def _run(overrides, recorder=None, restore_dir=None, policies=None, monkeypatch=None):
    """One in-process run on one rank; `policies` collects the trained policy (the resident reference's model)."""
    if policies is not None:
        keep = reference.ResidentReference.__init__
        monkeypatch.setattr(reference.ResidentReference, "__init__",
                            lambda self, model, **kw: policies.append(model) or keep(self, model, **kw))
    cfg = load_config(None, [*overrides, "scaling.num_workers=1"])
    recorder = recorder or _Recorder()
    train(cfg, Worker(report=recorder.report, sink=recorder, restore_dir=restore_dir))
    return cfg, recorder


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.slow
def test_a_lora_run_starts_at_ln2_trains_the_adapters_and_exports_merged_and_adapter_models(
        tiny_task, tiny_run_overrides, monkeypatch):
    from peft import PeftModel

    policies = []
    cfg, rec = _run([*tiny_run_overrides, *LORA], policies=policies, monkeypatch=monkeypatch)
    first = rec.logged[1]
    # B = 0: the policy is exactly its base, the reference. Δw = Δl = 0, so every pair's loss is ln 2.
    assert first["delta_chosen/mean"] == first["delta_rejected/mean"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rec.logged[4]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the adapters trained
    assert "eval/answer_accuracy" in rec.logged[0] and "eval/answer_accuracy" in rec.logged[4]  # generate() works
    policy, input_ids = policies[0], torch.arange(24).reshape(2, 12) % 16  # within the character vocabulary
    assert isinstance(policy, PeftModel)
    trained = _logits(policy, input_ids)

    base = AutoModelForCausalLM.from_pretrained(tiny_task["model"])
    merged = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "export")  # plain transformers, no peft
    assert type(merged) is type(base)
    torch.testing.assert_close(_logits(merged, input_ids), trained, rtol=0, atol=1e-5)
    before, after = base.state_dict(), merged.state_dict()
    changed = sorted({k.split(".")[-2] for k in before if not torch.equal(before[k], after[k])})
    assert changed == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    cfg, _ = _run([*tiny_run_overrides, *LORA, "name=adapter", "export.lora=adapter"])  # the same run again
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_task["model"]), cfg.run_dir / "export")
    torch.testing.assert_close(_logits(adapter, input_ids), trained, rtol=0, atol=1e-5)
    assert (cfg.run_dir / "export" / "tokenizer.json").is_file()
    assert not (cfg.run_dir / "export" / "model.safetensors").exists()  # the adapter alone
    from huggingface_hub import ModelCard

    card = ModelCard.load(cfg.run_dir / "export" / "README.md")  # ours, not the stub peft writes
    assert card.data.library_name == "peft" and "mdpo-ray" in card.data.tags
    assert "LoRA r=4, alpha=8, exported as a peft adapter" in card.text and "AutoPeftModelForCausalLM" in card.text



def test_export_both_writes_the_merged_model_and_its_adapter_in_adapter_dir(tiny_task, tiny_run_overrides, tmp_path):
    """export.lora=both (an iterate round's export): the merged model loads without peft, the adapter in
    adapter/ over the base model, both computing the trained policy; the model card still goes on top."""
    from peft import PeftModel

    from mdpo_ray.config import ExportConfig
    from mdpo_ray.training.model import load_causal_lm, load_tokenizer
    from mdpo_ray.training.model_card import RunFacts, write_model_card

    cfg = ModelConfig(name_or_path=str(tiny_task["model"]), lora=LoraConfig(r=4, alpha=8))
    policy = lora.wrap(load_causal_lm(cfg, trainable=False), cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)  # as if trained: B = 0 would export the base model twice over
    input_ids = torch.arange(24).reshape(2, 12) % 16  # within the character vocabulary
    trained = _logits(policy, input_ids)
    state_dict = {key: value.clone() for key, value in policy.state_dict().items()}  # as rank 0 gathers it
    out = lora.export(state_dict, cfg, ExportConfig(lora="both"), load_tokenizer(cfg), tmp_path / "export")
    assert out == tmp_path / "export" and not state_dict  # the merge took the tensors over
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    torch.testing.assert_close(_logits(merged, input_ids), trained, rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_task["model"])
    assert not torch.allclose(_logits(base, input_ids), trained, atol=1e-3)
    adapter = PeftModel.from_pretrained(base, out / lora.ADAPTER_DIR)
    torch.testing.assert_close(_logits(adapter, input_ids), trained, rtol=0, atol=1e-5)
    assert not (out / lora.ADAPTER_DIR / "model.safetensors").exists()  # the adapter alone in adapter/
    assert (out / "tokenizer_config.json").is_file() and (out / lora.ADAPTER_DIR / "tokenizer_config.json").is_file()
    run_cfg = load_config(None, [*tiny_run_overrides, *LORA, "export.lora=both"])
    write_model_card(out, run_cfg, RunFacts(steps=4, data_counts=[], n_train_pairs=8, n_eval_pairs=0, n_problems=0))
    assert "AutoModelForCausalLM.from_pretrained" in (out / "README.md").read_text()

@pytest.mark.slow
def test_a_lora_run_with_a_precomputed_reference_gives_the_resident_losses(tiny_run_overrides):
    _, resident = _run([*tiny_run_overrides, *LORA, NO_DECODING])
    _, precomputed = _run([*tiny_run_overrides, *LORA, NO_DECODING, "reference=precompute", "name=precompute"])
    assert precomputed.logged[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for step in (1, 2, 3, 4):
        for key in ("loss", "logps/ref_chosen", "logps/ref_rejected", "rewards/margins"):
            assert precomputed.logged[step][key] == pytest.approx(resident.logged[step][key], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_lora_checkpoints_hold_the_adapters_and_resume_the_same_trajectory(tiny_run_overrides, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    overrides = [*tiny_run_overrides, *LORA, NO_DECODING, "optim.warmup_steps=3"]
    _, straight = _run(overrides)
    first = _Recorder(keep=tmp_path)
    _run([*overrides, "name=interrupted", "optim.max_steps=2"], first)
    keys = list(FileSystemReader(str(first.checkpoints[-1])).read_metadata().state_dict_metadata)
    weights = [k for k in keys if k.startswith("model.")]
    assert len(weights) == 28 and all(".lora_A." in k or ".lora_B." in k for k in weights)  # no frozen base
    moments = [k for k in keys if k.startswith("optim.state.")]
    assert moments and all(".lora_A." in k or ".lora_B." in k for k in moments)
    _, resumed = _run([*overrides, "name=interrupted"], restore_dir=first.checkpoints[-1])
    for step in (3, 4):
        assert resumed.logged[step]["loss"] == pytest.approx(straight.logged[step]["loss"], rel=1e-6)


_TWO_RANKS = r"""
import gc, json, sys

import torch.distributed as dist

from mdpo_ray.config import load_config
from mdpo_ray.training.train_loop import Worker, train

rank, store, out, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)


class Sink:
    logged = {}

    def log(self, metrics, step):
        self.logged.setdefault(step, {}).update(metrics)

    def tag(self, key, value):
        pass


sink = Sink()
train(load_config(None, [*overrides, "scaling.num_workers=2"]), Worker(sink=sink))
if rank == 0:
    open(out, "w").write(json.dumps(sink.logged))
gc.collect()  # FSDP2 state freed while the group lives (see test_distributed)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_lora_on_two_ranks_gives_the_one_rank_losses_and_export(tiny_run_overrides, tmp_path):
    """Rank 1 builds its model on the meta device: its half of each adapter must be rank 0's, or from
    step 2 on (once B has moved) the two runs part. The two ranks also accumulate 2 micro-batches each and
    checkpoint their blocks' activations, with the adapters-off reference forwards in between: the
    settings that fit a big model change none of the one-rank run's numbers."""
    import json

    # Three steps (A shapes B's first update, which steps 2 and 3 see), no eval set, one checkpoint: 2 cores.
    overrides = [*tiny_run_overrides, *LORA, NO_DECODING, "optim.max_steps=3", "data.eval=null",
                 "checkpoint.every_steps=3"]
    one_cfg, one = _run(overrides)
    two = [*overrides, "name=two", "optim.micro_batch_size=2", "scaling.activation_checkpointing=true"]
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_RANKS, str(r), str(tmp_path / "store"),
                               str(tmp_path / "two.json"), *two], stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errs = [proc.communicate(timeout=300)[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-3000:] for err in errs]
    logged = {int(step): metrics for step, metrics in json.loads((tmp_path / "two.json").read_text()).items()}
    assert logged[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for step in (1, 2, 3):
        assert logged[step]["loss"] == pytest.approx(one.logged[step]["loss"], rel=1e-5, abs=1e-6)
    one_export = AutoModelForCausalLM.from_pretrained(one_cfg.run_dir / "export").state_dict()
    two_export = AutoModelForCausalLM.from_pretrained(one_cfg.run_dir.parent / "two" / "export").state_dict()
    for key, value in one_export.items():
        torch.testing.assert_close(two_export[key], value, rtol=1e-4, atol=1e-5)  # sums in another order
