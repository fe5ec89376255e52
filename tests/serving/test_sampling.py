"""The serving engine's decoding options, on its own thread-free steps: a repetition penalty decodes
as transformers' ``generate`` with it, OpenAI's frequency and presence penalties move exactly the
tokens the answer holds by exactly their amounts, and warpers that keep only the top token sample
as greedy. (What the server takes, and how it refuses a bad value, is test_server's.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from helpers import engine_decode, left_padded_prompts, save_perturbed_adapters, tiny_causal_lm, tiny_chat_tokenizer  # noqa: E402
from qadapter.library.adapter_set import AdapterSet  # noqa: E402
from qadapter.serving.engine import Engine, Request, penalize  # noqa: E402

EOS, PAD = 2, 0  # tiny_causal_lm's


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An engine over one adapter on a tiny base, never started: the tests run its steps themselves."""
    paths = save_perturbed_adapters(tmp_path_factory.mktemp("sampling"), {"a": dict(alpha_tilde=0.9)}, tiny_causal_lm)
    adapter_set = AdapterSet.from_pretrained(paths, base_model=tiny_causal_lm())
    adapter_set.peft_model.eval()
    return Engine(adapter_set, tiny_chat_tokenizer(), max_batch=8)


@pytest.fixture(scope="module")
def prompts():
    ids, mask = left_padded_prompts(lengths=(7, 5, 9), seed=11)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def new_request(prompt, adapter="a", max_tokens=12, **options) -> Request:
    return Request(prompt=list(prompt), adapter=adapter, max_tokens=max_tokens, emit=lambda event: None, **options)


def generated(engine: Engine, prompt, adapter, max_tokens, **options) -> list[int]:
    """The adapter set's own greedy decoding through transformers' ``generate``, up to its end of text."""
    out = engine.adapter_set.generate(torch.tensor([prompt]), adapters=[adapter], max_new_tokens=max_tokens,
                                      eos_token_id=EOS, pad_token_id=PAD, do_sample=False, **options)
    out = out[0, len(prompt):].tolist()
    return out[:out.index(EOS)] if EOS in out else out


def test_greedy_with_a_repetition_penalty_is_transformers_generate_with_it(engine, prompts):
    """Token for token, penalized rows beside an unpenalized one in the same batch."""
    requests = [new_request(prompts[0], repetition_penalty=1.3),
                new_request(prompts[1], adapter=None, repetition_penalty=1.3),
                new_request(prompts[2]), new_request(prompts[2], repetition_penalty=0.8)]
    engine_decode(engine, requests)
    for r in requests:
        expected = generated(engine, r.prompt, r.adapter, r.max_tokens, repetition_penalty=r.repetition_penalty)
        assert r.tokens == expected, (r.adapter, r.repetition_penalty)
    # The penalty did change what is decoded (the test is not vacuous).
    assert requests[0].tokens != generated(engine, prompts[0], "a", 12)
    assert requests[3].tokens != requests[2].tokens
    # The base row is the base model's own generate: the penalty acts on its logits, not its log-probs.
    alone = tiny_causal_lm().generate(torch.tensor([prompts[1]]), max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD,
                                      do_sample=False, repetition_penalty=1.3)[0, len(prompts[1]):].tolist()
    assert requests[1].tokens == (alone[:alone.index(EOS)] if EOS in alone else alone)


def test_frequency_and_presence_penalties_move_the_answers_tokens_by_their_counts():
    """OpenAI's definition, by hand: score[t] -= frequency * count(t) + presence * (count(t) > 0), over
    the answer's tokens only (a prompt token is not penalized); every other score untouched."""
    logprobs = torch.randn(1, 11, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    r = new_request([4, 4, 9, 3], adapter=None, frequency_penalty=0.5, presence_penalty=0.25)
    r.tokens = [3, 7, 3, 3, 1]
    out = penalize(r, logprobs.clone())
    moved = {3: 3 * 0.5 + 0.25, 7: 0.5 + 0.25, 1: 0.5 + 0.25}
    for token in range(11):
        if token in moved:
            assert out[0, token].item() == pytest.approx(logprobs[0, token].item() - moved[token], abs=1e-6)
        else:
            assert out[0, token] == logprobs[0, token], token
    # Negative values reward repetition by the same amounts; no answer yet: nothing moves.
    r.frequency_penalty, r.presence_penalty = -1.0, -2.0
    assert penalize(r, logprobs)[0, 7].item() == pytest.approx(logprobs[0, 7].item() + 3.0, abs=1e-6)
    assert torch.equal(penalize(new_request([3], frequency_penalty=2.0, presence_penalty=2.0), logprobs), logprobs)


def test_sample_penalizes_only_the_rows_that_ask(engine):
    """Two rows of the same log-probs, whose top token (1) the answers already hold: the greedy row
    keeps it (the batched argmax), the row with a presence penalty moves to the runner-up (2)."""
    scores = torch.full((11,), -5.0)
    scores[1], scores[2] = 3.0, 2.9
    logprobs = scores.log_softmax(-1).repeat(2, 1)
    plain, penalized = new_request([5]), new_request([5], presence_penalty=0.2)
    plain.tokens, penalized.tokens = [1], [1]
    assert engine._sample([plain, penalized], logprobs).tolist() == [1, 2]


def test_a_large_presence_penalty_under_greedy_never_repeats_a_token(engine, prompts):
    plain = new_request(prompts[0], max_tokens=40)
    penalized = new_request(prompts[0], max_tokens=40, presence_penalty=100.0)
    engine_decode(engine, [plain, penalized])
    assert len(set(plain.tokens)) < len(plain.tokens)  # the tiny model repeats itself when let
    assert len(penalized.tokens) > 10 and len(set(penalized.tokens)) == len(penalized.tokens)


def test_warpers_keeping_only_the_top_token_sample_as_greedy_and_a_seed_repeats_a_draw(engine, prompts):
    greedy = new_request(prompts[1], max_tokens=16)
    top_k = new_request(prompts[1], max_tokens=16, temperature=1.0, top_k=1)
    min_p = new_request(prompts[1], max_tokens=16, temperature=1.0, min_p=1.0)
    options = dict(max_tokens=16, temperature=1.0, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                   frequency_penalty=0.5, presence_penalty=0.5, seed=3)
    drawn = [new_request(prompts[1], **options), new_request(prompts[1], **options)]
    engine_decode(engine, [greedy, top_k, min_p, *drawn])
    assert top_k.tokens == greedy.tokens and min_p.tokens == greedy.tokens
    assert drawn[0].tokens == drawn[1].tokens and drawn[0].tokens


@pytest.mark.parametrize("option, value", [("temperature", -1.0), ("top_k", 2.5), ("top_p", 0.0), ("min_p", 2.0),
                                           ("repetition_penalty", 0.0), ("frequency_penalty", float("nan")),
                                           ("presence_penalty", float("inf")), ("seed", -3), ("top_k", True),
                                           ("logit_bias", {5: 101.0}), ("logit_bias", {10**6: 1.0}),
                                           ("logit_bias", {"5": 1.0})])
def test_a_request_the_engine_cannot_decode_is_refused_by_name_before_it_is_queued(engine, prompts, option, value):
    """The engine's own callers (not only the server, which checks the HTTP fields) hear of a bad value
    at submission, naming the option, instead of an error that ends the running batch."""
    with pytest.raises(ValueError, match=f"^{option} must be "):
        engine.submit(new_request(prompts[0], **{option: value}))
    assert engine._pending.empty()
