"""The serving engine's prefix cache: a chat's next turn and a shared system prompt are read from where
they differ from a finished request's sequence under the same policy, and decode as they do read
whole; the store keeps within its budget, least recently used first."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("peft")
from helpers import engine_decode, save_perturbed_adapters, tiny_causal_lm, tiny_chat_tokenizer  # noqa: E402
from qadapter.library.adapter_set import AdapterSet  # noqa: E402
from qadapter.serving.engine import Engine, Request  # noqa: E402
from qadapter.serving.prefix_cache import PrefixCache  # noqa: E402


@pytest.fixture(scope="module")
def adapter_set(tmp_path_factory):
    paths = save_perturbed_adapters(tmp_path_factory.mktemp("prefix"), {"a": dict(alpha_tilde=0.9),
                                                                        "b": dict(alpha_0=0.3)}, tiny_causal_lm)
    served = AdapterSet.from_pretrained(paths, tiny_causal_lm())
    served.peft_model.eval()
    return served


def decoded(engine, prompt, adapter, max_tokens=6):
    request = Request(prompt=prompt, adapter=adapter, max_tokens=max_tokens, emit=lambda event: None, logprobs=3)
    engine_decode(engine, [request])
    return request


def hits(engine) -> float:
    return engine.metrics.prefix_cache_hits._value.get()


def test_a_chats_next_turn_is_read_from_where_it_differs(adapter_set):
    tokenizer = tiny_chat_tokenizer()
    engine = Engine(adapter_set, tokenizer, prefix_cache_bytes=1 << 20)
    first = decoded(engine, [5, 17, 33, 8, 21, 40, 11], "a")
    assert hits(engine) == 0 and len(first.tokens) == 6
    turn = first.prompt + first.tokens + [9, 14, 60]
    second = decoded(engine, turn, "a")
    # Stored: the prompt and the answer tokens fed back (all but the last); read now: the rest.
    assert hits(engine) == len(first.prompt) + len(first.tokens) - 1
    assert second.tokens == decoded(Engine(adapter_set, tokenizer), turn, "a").tokens
    assert re.search(rf'qadapter:prefix_cache_bytes{{model_name="[^"]+"}} {float(engine.prefix_cache.held)}',
                     engine.metrics.render().decode())
    other = decoded(engine, turn, "b")  # another policy's rows hold other KV: nothing reused
    assert hits(engine) == len(first.prompt) + len(first.tokens) - 1
    assert other.tokens == decoded(Engine(adapter_set, tokenizer), turn, "b").tokens


def test_a_shared_system_prompt_is_read_once_per_policy(adapter_set):
    tokenizer = tiny_chat_tokenizer()
    engine = Engine(adapter_set, tokenizer, prefix_cache_bytes=1 << 20)
    system = [7, 23, 41, 12, 30, 55, 19, 4]
    decoded(engine, system + [70, 71], None)
    questions = [system + [80, 81, 82], system + [90], system[:5] + [3]]
    requests = [Request(prompt=p, adapter=None, max_tokens=5, emit=lambda event: None) for p in questions]
    engine_decode(engine, requests)  # read together, each after its own stored prefix
    assert hits(engine) == len(system) + len(system) + 5
    for request in requests:
        assert request.tokens == decoded(Engine(adapter_set, tokenizer), request.prompt, None, 5).tokens


def test_the_store_keeps_within_its_budget_least_recent_first():
    def kv(rows, n):  # 2 float32 tensors of rows * 2 * n * 4: 64 bytes a token on a row
        return [(torch.randn(rows, 2, n, 4), torch.randn(rows, 2, n, 4))]

    store = PrefixCache(budget=40 * 64)
    store.store(("p",), [1, 2, 3, 4, 5], kv(2, 5))
    store.store(("p",), [1, 2, 3, 4, 5, 6, 7], kv(2, 7))  # extends the first, which goes
    assert len(store) == 1 and store.held == 14 * 64
    store.store(("q",), [1, 2, 3], kv(3, 3))
    assert store.longest(("p",), [1, 2, 3, 9])[0] == 3 and store.longest(("q",), [1, 2, 3, 4])[0] == 3
    assert store.longest(("p",), [1, 2])[0] == 1  # the prompt's last token is always read
    assert store.longest(("r",), [1, 2, 3]) == (0, None)
    assert store.longest(("p",), [1, 2, 3, 4, 5, 6, 7, 8])[0] == 7  # p used last: q is the least recent
    store.store(("r",), list(range(10, 30)), kv(1, 20))  # 20 more is over 40: q goes
    assert store.held == 34 * 64 and store.longest(("q",), [1, 2, 3, 4]) == (0, None)
    store.store(("s",), list(range(50)), kv(1, 50))  # over the whole budget: not kept
    assert store.held == 34 * 64 and len(store) == 2
    with pytest.raises(ValueError, match=re.escape("budget must be an integer >= 1 (bytes); got 0")):
        PrefixCache(0)


def test_sequences_of_a_policy_that_part_are_each_kept_and_only_an_extended_one_goes():
    """Two chats after one system prompt (sequences that part) are both kept; a sequence that extends
    one of them replaces that one alone, not another policy's of the same tokens."""
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, 90, (6,), generator=g).tolist()
    first, second = system + [91, 92], system + [93, 94, 95]

    def kv(tokens):  # keys and values of one row: 64 bytes a token
        return [(torch.randn(1, 2, len(tokens), 4, generator=g), torch.randn(1, 2, len(tokens), 4, generator=g))]

    store = PrefixCache(budget=1 << 20)
    store.store(("p",), first, kv(first))
    store.store(("p",), second, kv(second))
    assert len(store) == 2 and store.held == (len(first) + len(second)) * 64
    for stored in (first, second):
        shared, entry = store.longest(("p",), stored + [7])
        assert shared == len(stored) and entry.tokens == tuple(stored)
    store.store(("q",), first, kv(first))
    longer = first + [96]
    store.store(("p",), longer, kv(longer))
    assert len(store) == 3 and store.held == (len(longer) + len(second) + len(first)) * 64
    assert store.longest(("q",), first + [7])[1].tokens == tuple(first)
    assert store.longest(("p",), first + [7])[1].tokens == tuple(longer)
    assert store.longest(("p",), second + [7])[1].tokens == tuple(second)


def test_a_sliding_window_model_refuses_the_prefix_cache():
    served = AdapterSet(tiny_causal_lm("mistral"), tokenizer=None)
    with pytest.raises(ValueError, match="sliding window"):
        Engine(served, tiny_chat_tokenizer(), prefix_cache_bytes=1 << 20)


def test_an_unloaded_adapters_entries_go(tmp_path):
    paths = save_perturbed_adapters(tmp_path, {"a": dict(alpha_tilde=0.9), "b": dict(alpha_0=0.3)}, tiny_causal_lm)
    served = AdapterSet.from_pretrained(paths, tiny_causal_lm())
    served.peft_model.eval()
    engine = Engine(served, tiny_chat_tokenizer(), prefix_cache_bytes=1 << 20)
    for adapter in ("a", "b", None):
        decoded(engine, [5, 17, 33, 8], adapter)
    assert len(engine.prefix_cache) == 3
    engine.unload_adapter("a")
    assert len(engine.prefix_cache) == 2
    assert engine.prefix_cache.longest(engine._policy_key("b"), [5, 17, 33, 8, 1])[0] == 4
    assert engine.prefix_cache.longest((), [5, 17, 33, 8, 1])[0] == 4


def test_a_batch_out_of_memory_empties_the_cache_and_the_engine_goes_on(adapter_set, monkeypatch):
    """Out of memory, the running batch is lost (its clients hear why) and the prefix cache, which only
    saves work, gives its memory to the batches after it; they decode as without the cache."""
    tokenizer = tiny_chat_tokenizer()
    engine = Engine(adapter_set, tokenizer, prefix_cache_bytes=1 << 20).start()
    try:
        events = []

        def request(prompt):
            return Request(prompt=prompt, adapter="a", max_tokens=4, emit=events.append)

        engine.submit(request([5, 17, 33, 8, 21]))
        assert engine.wait_idle() and len(engine.prefix_cache) == 1
        step = engine._step

        def out_of_memory():
            monkeypatch.setattr(engine, "_step", step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(engine, "_step", out_of_memory)
        engine.submit(request([5, 17, 33, 8, 40]))
        assert engine.wait_idle() and events[-1]["error"].startswith("OutOfMemoryError: CUDA out of memory")
        assert len(engine.prefix_cache) == 0 and engine.prefix_cache.held == 0
        after = request([5, 17, 33, 8, 40])
        engine.submit(after)
        assert engine.wait_idle() and events[-1]["finish_reason"] == "length"
        assert after.tokens == decoded(Engine(adapter_set, tokenizer), after.prompt, "a", 4).tokens
    finally:
        engine.stop()


def test_a_request_ended_before_its_batch_fails_is_ended_once(adapter_set):
    """Keeping an ended request's KV can fail (out of memory) after its end was emitted: the batch's
    other requests hear the error; the ended one keeps its end, counted once, and the engine holds
    no request for its adapter (which can then be unloaded)."""
    engine = Engine(adapter_set, tiny_chat_tokenizer(), prefix_cache_bytes=1 << 20)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("simulated")

    engine.prefix_cache.store = out_of_memory
    heard = {"short": [], "long": []}
    for name, max_tokens in (("short", 2), ("long", 6)):
        engine.submit(Request(prompt=[5, 17, 33, 8], adapter="a", max_tokens=max_tokens, emit=heard[name].append,
                              logit_bias={2: -100.0}))  # no EOS: each runs to its max_tokens
    engine.start()
    try:
        assert engine.wait_idle(30)
    finally:
        engine.stop()
    ends = {name: [e for e in events if "finish_reason" in e or "error" in e] for name, events in heard.items()}
    assert [e.get("finish_reason") for e in ends["short"]] == ["length"]
    assert len(ends["long"]) == 1 and "OutOfMemoryError" in ends["long"][0]["error"]
    finished = {reason: series._value.get() for reason, series in engine.metrics.finished.items()}
    assert finished["length"] == finished["error"] == 1
    assert engine._outstanding == 0 and engine._in_flight["a"] == 0
