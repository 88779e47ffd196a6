"""Fast tier: loading and exporting Hugging Face models (tiny random-init ones, saved and read back)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from mdpo_ray.config import ModelConfig
from mdpo_ray.task.arith import build_tokenizer
from mdpo_ray.training.model import export_pretrained, load_causal_lm


@pytest.mark.parametrize("tied", [False, True])
def test_export_writes_the_given_weights_with_the_base_models_settings(tmp_path, tied):
    """The exported directory holds the state dict it was given (not the base model's weights, which
    export no longer reads), and keeps the base model's generation settings."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    base.generation_config = GenerationConfig(eos_token_id=[3, 5], max_new_tokens=7)
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "model.safetensors").unlink()  # export must not need them (nor hold a second copy)
    trained = {k: v + 1.0 for k, v in base.state_dict().items()}  # differs from the base everywhere
    if tied:
        del trained["lm_head.weight"]  # a full FSDP2 state dict names a tied head once
    out = export_pretrained(dict(trained), ModelConfig(name_or_path=str(tmp_path / "base")), build_tokenizer(),
                            tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out)
    for key, value in exported.state_dict().items():
        want = trained["model.embed_tokens.weight"] if tied and key == "lm_head.weight" else trained[key]
        assert torch.equal(value, want), key
    assert exported.config.tie_word_embeddings == tied
    assert exported.generation_config.eos_token_id == [3, 5] and exported.generation_config.max_new_tokens == 7


def test_export_refuses_a_state_dict_of_another_architecture(tmp_path):
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "base")
    with pytest.raises(AssertionError, match="model.layers.1"):
        export_pretrained({"model.embed_tokens.weight": torch.zeros(64, 32)},
                          ModelConfig(name_or_path=str(tmp_path / "base")), build_tokenizer(), tmp_path / "export")


def test_weights_false_builds_the_architecture_without_reading_or_allocating(tmp_path):
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "model.safetensors").unlink()  # nothing to read: only config.json is left
    model = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "base")), trainable=True, weights=False)
    assert all(p.is_meta for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
