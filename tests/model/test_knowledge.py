"""The knowledge probe: generated candidates, the shipped probe, and the two scorings."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import default_model_available, tiny_causal_lm, tiny_chat_tokenizer
from qadapter.evaluation import knowledge
from qadapter.evaluation.knowledge import (
    candidates,
    general_passages,
    greedy_correct,
    likeliest_options,
    load_probe,
    option_scores,
    score_probe,
)
from qadapter.evaluation.measures import likelihood


def test_candidates_are_well_formed_and_deterministic():
    items = candidates(0)
    assert len(items) >= 600
    assert items == candidates(0)
    assert items != candidates(1)
    for item in items:
        assert set(item) >= {"question", "options", "answer", "accepted"}
        assert item["question"].endswith("?")
        assert len(item["options"]) == 4 and all(isinstance(o, str) and o for o in item["options"])
        assert 0 <= item["answer"] < 4
        assert item["accepted"] and all(a == a.lower() for a in item["accepted"])
        correct = [o.lower() in item["accepted"] for o in item["options"]]
        assert correct.count(True) == 1 and correct[item["answer"]]
        assert len({o.lower() for o in item["options"]}) == 4
    assert len({i["question"] for i in items}) == len(items)
    # the correct option's position is shuffled
    assert {i["answer"] for i in items} == {0, 1, 2, 3}


def test_shipped_probe_loads_and_comes_from_the_generator():
    questions = load_probe()
    assert len(questions) >= 150
    generated = candidates(0)
    assert all(q in generated for q in questions)
    data = json.loads(knowledge.DATA_FILE.read_text(encoding="utf-8"))
    assert data["seed"] == 0 and data["model"] == "smollm2-135m-instruct"


@pytest.mark.parametrize("content, fragment", [
    ("not json", "not valid JSON"),
    ("[]", "'questions' list"),
    (json.dumps({"questions": [{"question": "Q?", "options": ["a", "b"], "answer": 2, "accepted": ["a"]}]}),
     "'answer'"),
    (json.dumps({"questions": [{"question": "Q?", "options": ["a", "b"], "answer": 0}]}), "'accepted'"),
    (json.dumps({"questions": [{"question": "Q?", "options": ["a", "b"], "answer": 0, "accepted": []}]}),
     "'accepted'"),
])
def test_malformed_probe_file_names_the_file(tmp_path, content, fragment):
    path = tmp_path / "probe.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=fragment) as info:
        load_probe(path)
    assert str(path) in str(info.value)


def test_greedy_correct_matches_whole_words_only():
    items = [{"accepted": ["12", "twelve"]}, {"accepted": ["12", "twelve"]}, {"accepted": ["paris"]},
             {"accepted": ["c"]}, {"accepted": ["c"]}, {"accepted": ["new delhi", "delhi"]}]
    texts = ["5 plus 7 is 112.", "5 plus 7 is 12.", "The capital is PARIS.", "It's Ca.", "It is C.",
             "The capital of India is New Delhi."]
    assert greedy_correct(texts, items) == [False, True, True, False, True, True]
    assert greedy_correct(["Twelve."], items[:1]) == [True]
    with pytest.raises(ValueError):
        greedy_correct(["one"], items)


ITEMS = [
    {"question": "Which one?", "options": ["xyz", "abc", "def", "ghk"], "answer": 0, "accepted": ["xyz"]},
    {"question": "And which one here?", "options": ["abc", "mno", "ghk", "def"], "answer": 1, "accepted": ["mno"]},
]


def _favouring(tokenizer, text: str, calls: list):
    """A fake model: next-token log-probabilities that favour the tokens of ``text``, whatever the context."""
    favoured = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)

    def logprobs_fn(input_ids, attention_mask, position_ids, targets):
        calls.append(input_ids.shape[0])
        logits = torch.zeros(targets.ids.shape[0], len(tokenizer))
        logits[:, favoured] = 10.0
        return torch.log_softmax(logits, dim=-1).gather(1, targets.ids.unsqueeze(1)).squeeze(1)

    return logprobs_fn


@pytest.mark.parametrize("favoured", ["xyz", "abc", "def", "ghk", "mno"])
def test_option_scores_pick_the_favoured_option(favoured):
    tokenizer = tiny_chat_tokenizer()
    calls = []
    picked = likeliest_options(_favouring(tokenizer, favoured, calls), tokenizer, ITEMS, batch_size=3)
    for item, k in zip(ITEMS, picked):
        if favoured in item["options"]:
            assert item["options"][k] == favoured
    assert max(calls) <= 3 and sum(calls) == 8


def test_option_scores_respect_padding():
    """A real (tiny, random) causal LM: batched right-padded scores equal unpadded one-row scores."""
    tokenizer = tiny_chat_tokenizer()
    model = tiny_causal_lm(vocab=len(tokenizer))
    items = knowledge.candidates(0)[:12]

    logprobs_fn = likelihood(model)
    one = likeliest_options(logprobs_fn, tokenizer, items, batch_size=1)
    assert likeliest_options(logprobs_fn, tokenizer, items, batch_size=16) == one
    result = score_probe(logprobs_fn, lambda qs: [items[0]["options"][items[0]["answer"]]] * len(qs), tokenizer,
                         items[:1])
    assert result == {"loglik_accuracy": float(one[0] == items[0]["answer"]), "greedy_accuracy": 1.0, "n": 1}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_options_score_as_their_own_rows_do(monkeypatch, family):
    """A padding-free likelihood runs each item's prompt once (its options' rows share it) and gives
    every option the score of its own right-padded row."""
    from qadapter.library import packing

    tokenizer = tiny_chat_tokenizer()
    model = tiny_causal_lm(family, vocab=len(tokenizer))
    items = knowledge.candidates(0)[:12]
    assert max(len(tokenizer(o).input_ids) for it in items for o in it["options"]) > 1  # multi-token options
    packed_batches = []
    pack_batch = packing.pack_batch
    monkeypatch.setattr(packing, "pack_batch", lambda *a, **k: packed_batches.append(pack_batch(*a, **k)) or packed_batches[-1])

    one = option_scores(likelihood(model, padding_free=False), tokenizer, items, batch_size=5)
    assert not packed_batches
    packed = option_scores(likelihood(model), tokenizer, items, batch_size=5)
    assert packed_batches and all(b is not None for b in packed_batches)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(one), rtol=1e-5, atol=1e-5)
    assert likeliest_options(likelihood(model), tokenizer, items) == \
        likeliest_options(likelihood(model, padding_free=False), tokenizer, items)


def test_general_prompts_and_passages():
    assert len(knowledge.GENERAL_PROMPTS) == 40 and len(set(knowledge.GENERAL_PROMPTS)) == 40
    passages = general_passages()
    assert len(passages) >= 8
    assert 1000 <= sum(len(p.split()) for p in passages) <= 1500


@pytest.mark.skipif(not default_model_available(), reason="needs the embedded default model")
def test_embedded_model_gets_shipped_questions_right_by_loglik():
    from qadapter.library.defaults import load_base

    model, tokenizer = load_base()
    items = load_probe()[::40]

    logprobs_fn = likelihood(model)
    assert likeliest_options(logprobs_fn, tokenizer, items) == [i["answer"] for i in items]
    padded = likeliest_options(likelihood(model, padding_free=False), tokenizer, items)
    assert padded == [i["answer"] for i in items]


def test_a_tie_picks_the_first_option():
    """Options scored alike (a model indifferent to them): the first one is picked, as documented."""
    tokenizer = tiny_chat_tokenizer()

    def indifferent(input_ids, attention_mask, position_ids, targets):
        return torch.zeros(targets.ids.shape[0])

    assert option_scores(indifferent, tokenizer, ITEMS) == [[0.0] * len(it["options"]) for it in ITEMS]
    assert likeliest_options(indifferent, tokenizer, ITEMS) == [0] * len(ITEMS)
