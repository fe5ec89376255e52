"""The serving engine's running batch against each request alone, on random schedules: requests of
random prompts, models (the base, single adapters, a three-level stack and its levels), lengths,
sampling options, stop strings, log-probs and echoes join a running batch at random steps, repeat
each other's prompts (read once, cache rows copied) or their beginnings, or continue earlier prompts
and answers as a chat's next turn (read from the prefix cache after the first finishes), and queue
behind a full batch or a spent prefill budget; every request gets the events it gets decoded alone
(tokens, text, log-probs, finish reason)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("peft")
from helpers import (  # noqa: E402
    engine_decode,
    perturb_adapter,
    save_three_level_stack,
    tiny_causal_lm,
    tiny_chat_tokenizer,
)
from qadapter.library.adapter_set import AdapterSet  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402
from qadapter.serving.engine import Engine, Request  # noqa: E402

VOCAB = 97
REQUESTS = 8
STOP_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.fixture(scope="module")
def adapter_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    levels = save_three_level_stack(folder, tiny_causal_lm)
    single = QAdapterModel(tiny_causal_lm(), alpha_0=0.7, alpha_tilde=1.1)
    perturb_adapter(single, seed=9)
    single.save_pretrained(folder / "single")
    served = AdapterSet.from_pretrained({"one": levels[0], "two": levels[1], "three": levels[2],
                                         "single": folder / "single"}, tiny_causal_lm())
    served.peft_model.eval()
    return served


def random_specs(rng: random.Random) -> list[dict]:
    """Request options (everything but ``emit``), some repeating an earlier prompt and model."""
    names = [None, "one", "two", "three", "single"]
    specs = []
    for _ in range(REQUESTS):
        if specs and rng.random() < 0.3:  # n choices, or lm-eval's repeated contexts
            earlier = rng.choice(specs)
            prompt, adapter = earlier["prompt"], earlier["adapter"]
        elif specs and rng.random() < 0.4:  # a shared beginning (a system prompt, an earlier turn), any model
            earlier = rng.choice(specs)["prompt"]
            prompt = earlier[:rng.randint(1, len(earlier))] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(0, 6))]
            adapter = rng.choice(names)
        else:
            prompt, adapter = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 10))], rng.choice(names)
        spec = dict(prompt=prompt, adapter=adapter, logprobs=rng.choice([None, None, 0, 3]))
        spec["echo"] = spec["logprobs"] is not None and rng.random() < 0.5
        spec["max_tokens"] = rng.choice([0, 1, 4, 9]) if spec["echo"] else rng.choice([1, 4, 9])
        if rng.random() < 0.5:
            spec.update(temperature=0.8, seed=rng.randrange(1000), top_k=rng.choice([0, 20]),
                        top_p=rng.choice([1.0, 0.9]))
        if rng.random() < 0.3:
            spec.update(frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2)
        if rng.random() < 0.3:
            spec["logit_bias"] = {rng.randrange(3, VOCAB): 4.0}
        if rng.random() < 0.4:  # the tiny tokenizer's tokens are single characters: some stop early
            spec["stop"] = (*rng.sample(STOP_CHARACTERS, 4), "".join(rng.sample(STOP_CHARACTERS, 2)))
        specs.append(spec)
    return specs


def comparable(events: list[dict]) -> dict:
    """What a client hears: the text, the finish reason, and every log-prob entry (the token, and its
    and the alternatives' log-probs as tensors to compare within a tolerance)."""
    entries = [entry for e in events for entry in [*e.get("prompt_logprobs", ()), *e.get("logprobs", ())]]
    return {
        "text": "".join(e.get("text", "") for e in events),
        "finish": [e["finish_reason"] for e in events if "finish_reason" in e],
        "tokens": [entry[0] for entry in entries],
        "logprobs": torch.tensor([entry[1] for entry in entries if entry[1] is not None], dtype=torch.float64),
        "top": [torch.tensor([lp for _, lp in entry[2]], dtype=torch.float64) for entry in entries if entry[2]],
    }


@pytest.mark.parametrize("seed", range(40))
def test_random_schedules_decode_each_request_as_alone(adapter_set, seed):
    rng = random.Random(seed)
    specs = random_specs(rng)
    tokenizer = tiny_chat_tokenizer()
    engine = Engine(adapter_set, tokenizer, max_batch=rng.choice([3, 8]), max_prefill_tokens=rng.choice([None, 24]),
                    prefix_cache_bytes=rng.choice([0, 15_000, 250_000]))
    events = [[] for _ in specs]
    requests = [Request(**spec, emit=events[i].append) for i, spec in enumerate(specs)]
    with torch.inference_mode():
        for request in requests:
            for _ in range(rng.randint(0, 2)):  # steps the running batch takes before this one arrives
                if engine._running:
                    engine._step()
            engine.submit(request)
            if rng.random() < 0.7:  # else it waits in the queue with the next
                engine._admit(wait=False)
    engine_decode(engine, [])  # the rest: admitted as room and the prefill budget allow

    # A chat's next turns: earlier prompts with (part of) their answers and a few more tokens, after them.
    for earlier in rng.sample(requests, 3):
        answer = earlier.tokens[:rng.randint(0, len(earlier.tokens))]
        specs.append(dict(prompt=earlier.prompt + answer + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 4))],
                          adapter=rng.choice([earlier.adapter, "single"]), max_tokens=rng.choice([1, 4]),
                          logprobs=rng.choice([None, 2])))
        events.append([])
        requests.append(Request(**specs[-1], emit=events[-1].append))
    engine_decode(engine, requests[-3:])

    for i, spec in enumerate(specs):
        alone_events = []
        alone = Request(**spec, emit=alone_events.append)
        engine_decode(Engine(adapter_set, tokenizer), [alone])
        got, want = comparable(events[i]), comparable(alone_events)
        context = f"request {i}: {spec}"
        assert requests[i].tokens == alone.tokens, context
        assert got["finish"] == want["finish"] and len(got["finish"]) == 1, context
        assert got["tokens"] == want["tokens"] and got["text"] == want["text"], context
        torch.testing.assert_close(got["logprobs"], want["logprobs"], rtol=1e-5, atol=1e-5, msg=context)
        assert len(got["top"]) == len(want["top"]), context
        for g, w in zip(got["top"], want["top"]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=context)
