"""Which layers the LoRA wraps: by default the attention's query and value projections, by the names
each architecture gives them; a named layer the model does not have is refused, not ignored."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from helpers import tiny_causal_lm  # noqa: E402
from qadapter.library.lora import lora_targets  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402
from qadapter.library.trainer import QAdapterConfig  # noqa: E402


def wrapped_layers(model: QAdapterModel) -> set[str]:
    return {name.split(".")[-4] for name, _ in model.peft_model.named_parameters() if ".lora_A." in name}


def tiny_gpt_neox():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family, expected", [("llama", {"q_proj", "v_proj"}), ("qwen2", {"q_proj", "v_proj"}),
                                              ("phi3", {"qkv_proj"})])
def test_the_default_is_the_query_and_value_projections_by_the_architectures_names(family, expected):
    model = QAdapterModel(tiny_causal_lm(family))
    assert wrapped_layers(model) == expected
    assert set(model.peft_model.peft_config["default"].target_modules) == expected
    ids = torch.randint(3, 97, (2, 6))
    model(ids, torch.ones_like(ids), torch.where(torch.arange(6) < 2, -100, ids)).loss.backward()  # it trains


def test_a_fused_query_key_value_projection_is_the_default_where_peft_names_one():
    assert wrapped_layers(QAdapterModel(tiny_gpt_neox())) == {"query_key_value"}


def test_named_layers_are_wrapped_and_ones_the_model_lacks_refused():
    model = QAdapterModel(tiny_causal_lm("llama"), target_modules=["k_proj", "down_proj"])
    assert wrapped_layers(model) == {"k_proj", "down_proj"}
    with pytest.raises(ValueError, match=r"target_modules: 'q_proj' names no linear layer of this model; its linear "
                                         r"layers: down_proj, gate_up_proj, o_proj, qkv_proj"):
        QAdapterModel(tiny_causal_lm("phi3"), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="'lm_head' is the output head, the Q head, which LoRA never wraps"):
        QAdapterModel(tiny_causal_lm("llama"), target_modules=["lm_head"])
    # PEFT's names by suffix: a path within the layer, or one layer alone.
    assert wrapped_layers(QAdapterModel(tiny_causal_lm("llama"), target_modules=["self_attn.q_proj"])) == {"q_proj"}
    one = QAdapterModel(tiny_causal_lm("llama"), target_modules=["layers.1.mlp.down_proj"])
    assert [n for n, _ in one.peft_model.named_parameters() if ".lora_A." in n] == [
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"]
    with pytest.raises(ValueError, match="'mlp.q_proj' names no linear layer"):
        QAdapterModel(tiny_causal_lm("llama"), target_modules=["mlp.q_proj"])
    with pytest.raises(TypeError, match="target_modules must be a list of layer names"):
        QAdapterModel(tiny_causal_lm("llama"), target_modules="q_proj")
    with pytest.raises(ValueError, match="at least one layer"):
        QAdapterModel(tiny_causal_lm("llama"), target_modules=[])


def test_a_generator_or_tuple_of_layer_names_is_those_layers_and_a_non_iterable_refused():
    """A generator is read once: checking it and then listing it found no layer."""
    names = (name for name in ["k_proj", "down_proj"])
    assert wrapped_layers(QAdapterModel(tiny_causal_lm("llama"), target_modules=names)) == {"k_proj", "down_proj"}
    assert wrapped_layers(QAdapterModel(tiny_causal_lm("llama"), target_modules=("o_proj",))) == {"o_proj"}
    with pytest.raises(TypeError, match="target_modules must be a list of layer names"):
        QAdapterModel(tiny_causal_lm("llama"), target_modules=3)


def test_the_training_config_default_is_the_models():
    options = QAdapterConfig(output_dir="unused").model_options()
    assert options["target_modules"] is None
    assert lora_targets(tiny_causal_lm("phi3"), options["target_modules"]) == ["qkv_proj"]
