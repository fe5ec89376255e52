"""A base model handed to a QAdapterModel or an AdapterSet is the caller's again once they are gone:
one process (a notebook) builds, trains, serves and drops them on one base again and again."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch

pytest.importorskip("peft")
from helpers import perturb_adapter, tiny_causal_lm  # noqa: E402
from qadapter.library.adapter_set import AdapterSet  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 13, 40, 50]])
PLAIN = dict(max_new_tokens=4, do_sample=False, eos_token_id=2, pad_token_id=0)
GREEDY = dict(PLAIN, compiled=False)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def assert_as_given(base, pristine):
    """``base`` is ``pristine`` again: its own modules, weights, flags and outputs, no PEFT config."""
    assert [(n, type(m)) for n, m in base.named_modules()] == [(n, type(m)) for n, m in pristine.named_modules()]
    want = pristine.state_dict()
    got = base.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [p.requires_grad for p in base.parameters()] == [p.requires_grad for p in pristine.parameters()]
    assert not hasattr(base, "peft_config")
    torch.testing.assert_close(logits(base), logits(pristine), rtol=0, atol=0)


def test_a_base_is_given_back_as_it_was_when_its_trained_qadapter_is_gone(tmp_path):
    base = tiny_causal_lm()
    pristine = copy.deepcopy(base)
    model = QAdapterModel(base)
    perturb_adapter(model)  # trained-looking: its policy is not the base's
    model.save_pretrained(tmp_path / "a")
    gone = weakref.ref(model.peft_model)
    del model
    gc.collect()
    assert gone() is None
    assert_as_given(base, pristine)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(second time|peft_config)")  # PEFT: a base wrapped already
        again = QAdapterModel(base)
    torch.testing.assert_close(logits(again.peft_model), logits(pristine), rtol=0, atol=0)  # a fresh adapter
    del again
    loaded = QAdapterModel.from_pretrained(tmp_path / "a", base)  # a base object given to from_pretrained
    assert not torch.equal(loaded.generate(IDS, **GREEDY), pristine.generate(IDS, **PLAIN))
    del loaded
    gc.collect()
    assert_as_given(base, pristine)


def test_a_second_model_on_a_base_in_use_is_refused_and_the_first_keeps_its_weights(tmp_path):
    """PEFT would inject a second adapter into the same layers, overwriting the first one's weights: a
    QAdapterModel, a saved one loaded onto the base, and an AdapterSet's first adapter are refused
    while the first lives; once it is dropped, the base takes another."""
    base = tiny_causal_lm()
    first = QAdapterModel(base)
    perturb_adapter(first)  # trained
    first.save_pretrained(tmp_path / "a")
    trained = {k: v.clone() for k, v in first.peft_model.state_dict().items() if "lora_" in k}
    refused = "base_model carries the LoRA layers of a QAdapterModel or AdapterSet still in use"
    with pytest.raises(ValueError, match=refused):
        QAdapterModel(base)  # a cell run again, `model = QAdapterModel(base)`, while `model` holds the first
    with pytest.raises(ValueError, match=refused):
        QAdapterModel.from_pretrained(tmp_path / "a", base)
    with pytest.raises(ValueError, match=refused):
        AdapterSet(base).load("a", tmp_path / "a")
    now = first.peft_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in trained.items())
    del first
    again = QAdapterModel.from_pretrained(tmp_path / "a", base)
    assert all(torch.equal(again.peft_model.state_dict()[k], v) for k, v in trained.items())


def test_a_base_an_adapter_set_served_runs_and_takes_another_adapter_set(tmp_path):
    source = QAdapterModel(tiny_causal_lm())
    perturb_adapter(source)
    source.save_pretrained(tmp_path / "a")
    del source
    base = tiny_causal_lm()
    pristine = copy.deepcopy(base)
    for _ in range(2):  # the second set on the base loads its adapter as the first did
        adapter_set = AdapterSet(base)
        adapter_set.load("a", tmp_path / "a")
        decoded = adapter_set.generate(IDS, adapters=["a"], **GREEDY)
        fresh = AdapterSet(copy.deepcopy(pristine))
        fresh.load("a", tmp_path / "a")
        assert torch.equal(decoded, fresh.generate(IDS, adapters=["a"], **GREEDY))
        del adapter_set, fresh
        gc.collect()  # a set holds itself in a cycle (its row plan): collected, not freed at once
        assert_as_given(base, pristine)


def test_a_base_with_peft_layers_of_its_own_is_refused_naming_them():
    """PEFT would add the Q-Adapter to the caller's LoRA layers and make it their active adapter: there
    is no plain base to give back, so such a base is refused, pointing to the plain model."""
    from peft import LoraConfig, inject_adapter_in_model

    base = tiny_causal_lm()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), base, adapter_name="mine")
    pristine = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"base_model carries PEFT layers of its own \(model.layers.0.self_attn.q_proj, "
                                         r"model.layers.1.self_attn.q_proj\): give the plain model"):
        QAdapterModel(base)
    assert [(n, type(m)) for n, m in base.named_modules()] == [(n, type(m)) for n, m in pristine.named_modules()]


def test_a_base_whose_live_model_took_its_layers_out_is_lent_afresh(tmp_path):
    """``peft_model.unload()`` gives the plain base back while the model lives (the GPU benchmark serves
    an AdapterSet on it so): nothing is left to overwrite, so it is lent afresh, and the earlier model,
    collected later, leaves the new one's layers alone."""
    base = tiny_causal_lm()
    pristine = copy.deepcopy(base)
    model = QAdapterModel(base)
    perturb_adapter(model)
    model.save_pretrained(tmp_path / "a")
    adapter_set = AdapterSet.from_pretrained({"a": tmp_path / "a"}, base_model=model.peft_model.unload())
    fresh = AdapterSet.from_pretrained({"a": tmp_path / "a"}, base_model=copy.deepcopy(pristine))
    del model
    gc.collect()
    assert torch.equal(adapter_set.generate(IDS, adapters=["a"], **GREEDY), fresh.generate(IDS, adapters=["a"], **GREEDY))
    del adapter_set, fresh
    gc.collect()
    assert_as_given(base, pristine)


def test_a_base_whose_adapter_set_awaits_collection_takes_another(tmp_path):
    """An AdapterSet dropped but not yet collected (it holds itself in a cycle) is collected when
    another one is built on its base: the base is given back first, not refused as still in use."""
    source = QAdapterModel(tiny_causal_lm())
    perturb_adapter(source)
    source.save_pretrained(tmp_path / "a")
    del source
    base = tiny_causal_lm()
    gc.collect()
    gc.disable()  # no automatic collection between the drop and the next set
    try:
        first = AdapterSet(base)
        first.load("a", tmp_path / "a")
        gone = weakref.ref(first)
        del first
        assert gone() is not None  # garbage in a cycle, not freed yet
        second = AdapterSet(base)
        second.load("a", tmp_path / "a")
        assert gone() is None
    finally:
        gc.enable()
    fresh = AdapterSet(tiny_causal_lm())
    fresh.load("a", tmp_path / "a")
    assert torch.equal(second.generate(IDS, adapters=["a"], **GREEDY), fresh.generate(IDS, adapters=["a"], **GREEDY))


def test_a_base_is_given_back_when_an_adapter_fails_to_load_onto_it(tmp_path):
    """PEFT injects the LoRA layers before it loads the weights: weights that do not fit them (a
    tensor of another shape) leave no layers and no loan behind, so the base is as given and takes
    the next model."""
    from qadapter.library.model import AdapterLoadError
    from safetensors.torch import load_file, save_file

    source = QAdapterModel(tiny_causal_lm())
    source.save_pretrained(tmp_path / "a")
    del source
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    save_file(tensors, weights, metadata={"format": "pt"})
    base = tiny_causal_lm()
    pristine = copy.deepcopy(base)
    with pytest.raises(AdapterLoadError, match="cannot be loaded"):
        QAdapterModel.from_pretrained(tmp_path / "a", base)
    assert_as_given(base, pristine)
    again = QAdapterModel(base)
    torch.testing.assert_close(logits(again.peft_model), logits(pristine), rtol=0, atol=0)
