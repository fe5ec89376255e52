"""Calls from several threads at once (a web app's workers) on one model: each gets what it gets
alone. The policy and the loss's passes set state on the shared network (each row's LoRA scaling,
adapters disabled, a hook on the decoder, the bank's selection); without one call at a time, 4
threads raised errors on most calls and decoded with each other's adapters on others."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

pytest.importorskip("peft")
from helpers import left_padded_prompts, make_model, pair_batch, save_perturbed_adapters, tiny_causal_lm  # noqa: E402

GREEDY = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, eos_token_id=None)
ROUNDS, THREADS = 4, 4


def at_once(calls) -> list:
    """Runs ``calls`` (functions of no argument) in threads started together; their results in order
    (an exception raised in one is its result)."""
    results, barrier = [None] * len(calls), threading.Barrier(len(calls))

    def run(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 -- the test compares it with what the call gives alone
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def prompts(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [left_padded_prompts(lengths=(4 + i % 3, 2 + (3 * i) % 5), seed=i) for i in range(count)]


def test_generate_from_threads_equals_generate_alone():
    model = make_model().eval()
    batches = prompts(THREADS)
    alone = [model.generate(ids, mask, **GREEDY) for ids, mask in batches]
    for _ in range(ROUNDS):
        got = at_once([lambda b=b: model.generate(*b, **GREEDY) for b in batches])
        for want, out in zip(alone, got):
            assert isinstance(out, torch.Tensor) and torch.equal(out, want), out


def test_an_adapter_set_from_threads_decodes_each_threads_adapter(tmp_path):
    from qadapter.library.adapter_set import AdapterSet

    paths = save_perturbed_adapters(tmp_path, {"a": dict(alpha_tilde=0.8, alpha_0=0.5),
                                               "b": dict(lora_r=4, alpha_tilde=1.2, alpha_0=1.0),
                                               "c": dict(alpha_tilde=0.5, alpha_0=0.2)}, tiny_causal_lm)
    adapter_set = AdapterSet.from_pretrained(paths, tiny_causal_lm())
    names, batches = ["a", "b", "c", None], prompts(THREADS)
    alone = {(k, n): adapter_set.generate(*batches[k], adapters=[n, n], **GREEDY) for k in range(THREADS) for n in names}
    for r in range(ROUNDS):
        got = at_once([lambda i=i: adapter_set.generate(*batches[(r + i) % THREADS], adapters=[names[i]] * 2, **GREEDY)
                       for i in range(THREADS)])
        for i, out in enumerate(got):
            assert isinstance(out, torch.Tensor) and torch.equal(out, alone[((r + i) % THREADS, names[i])]), out


def test_decoding_beside_a_loss_forward_leaves_both_as_alone():
    model = make_model()
    model.peft_model.eval()  # no dropout: the loss is a function of its inputs
    ids, mask = prompts(1)[0]
    decoded = model.generate(ids, mask, **GREEDY)
    loss = model(*pair_batch()).loss.detach()
    for _ in range(ROUNDS):
        got = at_once([lambda: model.generate(ids, mask, **GREEDY), lambda: model(*pair_batch()).loss.detach()] * 2)
        for out, want in zip(got, [decoded, loss] * 2):
            assert isinstance(out, torch.Tensor) and torch.equal(out, want), out


def test_loading_adapters_from_threads_leaves_the_warning_filters_as_they_were(tmp_path, monkeypatch):
    """Loading holds PEFT's warnings in a ``warnings.catch_warnings``, which saves and restores the
    module's process-wide state: two loads overlapping from two threads restored each other's, and
    left an "always" filter (and a dead recorder swallowing every later warning) for good."""
    import time

    import peft
    from qadapter.library.model import QAdapterModel

    make_model().save_pretrained(tmp_path / "adapter")
    bases = [tiny_causal_lm("llama") for _ in range(THREADS)]
    loading = peft.PeftModel.from_pretrained.__func__

    def slow_loading(cls, *args, **kwargs):  # the loads overlap, whatever the machine's speed
        time.sleep(0.05)
        return loading(cls, *args, **kwargs)

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", classmethod(slow_loading))
    filters = list(warnings.filters)
    results = at_once([lambda base=base: QAdapterModel.from_pretrained(tmp_path / "adapter", base) for base in bases])
    assert all(isinstance(model, QAdapterModel) for model in results), results
    assert list(warnings.filters) == filters


def test_every_wrapper_over_one_base_shares_its_lock():
    """The PEFT model, the QAdapterModel's passes (which hold the base) and the base itself take one
    lock: a decode through one and a loss pass through the other wait for each other."""
    from qadapter.library.one_at_a_time import network_lock

    model = make_model("llama")
    base = model.peft_model.get_base_model()
    assert network_lock(model.peft_model) is network_lock(base)
    assert network_lock(tiny_causal_lm()) is not network_lock(base)
