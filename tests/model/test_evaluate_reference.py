"""The evaluation measures against plain transformers forwards: the base's log-probs are
``log_softmax`` of its own logits (its soft cap included, Gemma-2's), the adapter's Q is the adapted
PEFT model's logits, and the customized policy is ``log_softmax((Q + alpha_0 * log pi1) / alpha~)``
written out here in float64 from those two forwards, never through the package's kernels. Log-probs
agree within 1e-4 (float32 forwards), the KL to the base within 1e-5 and is 0 (within 1e-6) for a
neutral adapter (a fresh one, Q = the base's logits, at ``alpha~ = 1 + alpha_0``)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("peft")
from helpers import perturb_adapter, tiny_causal_lm, tiny_chat_tokenizer, tiny_sentencepiece_tokenizer  # noqa: E402
from qadapter.evaluation.measures import (  # noqa: E402
    customized_likelihood,
    evaluate_pairs,
    likelihood,
    mean_kl,
    next_token_targets,
    perplexity,
)
from qadapter.library.data import IGNORE_INDEX  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402

TEXTS = ["the capital of France is Paris", "hello world", "Rome is in Italy and hello world the capital"]
ALPHA_0, ALPHA_TILDE = 0.3, 0.7


def soft_capped(vocab):
    base = tiny_causal_lm("gemma2", vocab=vocab)
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(40.0)  # the cap bites
    return base


@pytest.fixture(params=["llama, byte-level", "llama, sentencepiece BOS", "gemma2 soft cap"])
def setup(request):
    """(a perturbed adapter's model, a plain copy of its base, the tokenizer)."""
    tokenizer = tiny_sentencepiece_tokenizer() if "sentencepiece" in request.param else tiny_chat_tokenizer()
    make = (lambda: soft_capped(len(tokenizer))) if "gemma2" in request.param else \
        (lambda: tiny_causal_lm("llama", vocab=len(tokenizer)))
    model = QAdapterModel(make(), tokenizer=tokenizer, alpha_0=ALPHA_0, alpha_tilde=ALPHA_TILDE)
    perturb_adapter(model, scale=0.2)
    model.eval()
    return model, make(), tokenizer


@torch.no_grad()
def by_hand(model, plain, ids: list[int]):
    """Per position of ``ids`` but the last: (log pi1, log pi~) over the vocabulary, float64, from a
    forward of the plain base and one of the adapted PEFT model."""
    x = torch.tensor([ids])
    log_pi1 = torch.log_softmax(plain(x).logits[0, :-1].double(), -1)
    q = model.peft_model(input_ids=x).logits[0, :-1].double()
    return log_pi1, torch.log_softmax((q + ALPHA_0 * log_pi1) / ALPHA_TILDE, -1)


def right_padded(tokenizer, texts):
    rows = [tokenizer(t).input_ids for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
    return rows, ids, mask, labels


@pytest.mark.parametrize("padding_free", [True, False])
def test_likelihoods_are_plain_forwards_log_probs(setup, padding_free):
    model, plain, tokenizer = setup
    rows, ids, mask, labels = right_padded(tokenizer, TEXTS)
    targets = next_token_targets(labels)
    want_base, want_policy = [], []
    for row in rows:
        log_pi1, log_pi = by_hand(model, plain, row)
        at = torch.tensor(row[1:])[:, None]
        want_base.append(log_pi1.gather(1, at)[:, 0])
        want_policy.append(log_pi.gather(1, at)[:, 0])
    got_base = likelihood(plain, padding_free=padding_free)(ids, mask, None, targets)
    torch.testing.assert_close(got_base.double(), torch.cat(want_base), rtol=0, atol=1e-4)
    got_policy = customized_likelihood(model)(ids, mask, None, targets)
    torch.testing.assert_close(got_policy.double(), torch.cat(want_policy), rtol=0, atol=1e-4)
    with torch.no_grad():  # the adapted model as a plain LM: its own logits
        q = torch.log_softmax(model.peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), -1)
    want_q = q[targets.rows, targets.positions].gather(1, targets.ids[:, None])[:, 0]
    torch.testing.assert_close(likelihood(model.peft_model, padding_free=padding_free)(ids, mask, None, targets).double(),
                               want_q, rtol=0, atol=1e-4)


def test_perplexity_is_the_policys_by_hand(setup):
    """Each passage as its tokenizer encodes it (a BOS where it adds one), every next token scored."""
    model, plain, tokenizer = setup
    nll, count = 0.0, 0
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        _, log_pi = by_hand(model, plain, ids)
        nll -= log_pi.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        count += len(ids) - 1
    assert perplexity(customized_likelihood(model), tokenizer, TEXTS) == pytest.approx(math.exp(nll / count), rel=1e-4)


def pairs(tokenizer):
    """Tokenized pairs: a prompt, then the chosen and the rejected response scored."""
    out = []
    for prompt, chosen, rejected in [("the capital of", " France is Paris", " Rome"), ("hello", " world", " hello"),
                                     ("Rome is", " in Italy", " the capital of France")]:
        p = tokenizer(prompt).input_ids
        pair = {}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            r = tokenizer(text, add_special_tokens=False).input_ids
            pair[f"{side}_input_ids"], pair[f"{side}_labels"] = p + r, [IGNORE_INDEX] * len(p) + r
        out.append(pair)
    return out


def test_kl_to_the_base_is_the_policys_by_hand(setup):
    """Mean over every scored token of both responses of sum_v pi~ (log pi~ - log pi1)."""
    model, plain, tokenizer = setup
    features = pairs(tokenizer)
    total, count = 0.0, 0
    for pair in features:
        for side in ("chosen", "rejected"):
            ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
            log_pi1, log_pi = by_hand(model, plain, ids)
            scored = torch.tensor([label != IGNORE_INDEX for label in labels[1:]])
            total += (log_pi.exp() * (log_pi - log_pi1)).sum(-1)[scored].sum().item()
            count += int(scored.sum())
    got = mean_kl(model, features, tokenizer.pad_token_id or 0)
    assert got > 1e-3 and got == pytest.approx(total / count, rel=1e-4, abs=1e-5)


def test_a_neutral_adapter_is_the_base():
    """A fresh adapter at alpha~ = 1 + alpha_0: no KL to the base, its rewards its step-0 baseline's, its
    likelihoods the base's own."""
    tokenizer = tiny_sentencepiece_tokenizer()
    model = QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer=tokenizer, alpha_0=0.3,
                          alpha_tilde=1.3).eval()
    plain = tiny_causal_lm("llama", vocab=len(tokenizer))
    features = pairs(tokenizer)
    result = evaluate_pairs(model, features, 0, step0=True, per_pair=True)
    assert abs(result["kl_to_base"]) < 1e-6
    assert result["margins"] == pytest.approx(result["step0"]["margins"], abs=1e-6)
    assert result["accuracy"] == result["step0"]["accuracy"]
    rows, ids, mask, labels = right_padded(tokenizer, TEXTS)
    targets = next_token_targets(labels)
    torch.testing.assert_close(customized_likelihood(model)(ids, mask, None, targets),
                               likelihood(plain)(ids, mask, None, targets), rtol=0, atol=1e-5)
