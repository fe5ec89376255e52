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


def test_dropping_one_of_two_qadapters_on_a_base_leaves_the_other_its_layers():
    base = tiny_causal_lm()
    pristine = copy.deepcopy(base)
    first = QAdapterModel(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's: the base carries LoRA layers already
        second = QAdapterModel(base)  # a cell run again: `model = QAdapterModel(base)`
    del first
    gc.collect()
    perturb_adapter(second)
    assert not torch.equal(second.generate(IDS, **GREEDY), pristine.generate(IDS, **PLAIN))
    assert any("lora_" in name for name, _ in second.peft_model.named_parameters())
    del second
    gc.collect()
    assert_as_given(base, pristine)


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
