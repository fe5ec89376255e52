"""The one-pass evaluation gives the numbers of the straightforward one: a forward per batch of 8
pairs in the given order for the rewards, separate frozen and adapter passes, the KL from
separate batches of 4; and its step-0 baseline is a fresh adapter's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
from helpers import tiny_causal_lm, tiny_chat_tokenizer  # noqa: E402
from qadapter.evaluation.measures import answers, evaluate_pairs, mean_kl, preference_metrics  # noqa: E402
from qadapter.library.data import IGNORE_INDEX, PreferenceCollator, tokenize_rows  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402

from bench.common import HH_DATA as HH  # noqa: E402
from qadapter_kernels import combine_logits  # noqa: E402

PAD = 0
def ragged_pairs(count: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random pairs: prompts and responses of different lengths, responses that share a first token
    or two, one pair whose two sequences are identical and one where a response is a prefix."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    pairs = []
    for i in range(count):
        prompt = ids(int(torch.randint(1, 14, (1,), generator=g)))
        common = ids(int(torch.randint(0, 3, (1,), generator=g)))
        chosen = common + ids(int(torch.randint(1, 11, (1,), generator=g)))
        rejected = common + ids(int(torch.randint(1, 11, (1,), generator=g)))
        if i == 1:
            rejected = list(chosen)
        if i == 2:
            rejected = chosen[:1]
        pairs.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [IGNORE_INDEX] * len(prompt) + chosen,
                      "rejected_input_ids": prompt + rejected,
                      "rejected_labels": [IGNORE_INDEX] * len(prompt) + rejected})
    return pairs


def capped(logits: torch.Tensor, loss) -> torch.Tensor:
    """The model's own final logits: soft-capped where it caps them (Gemma-2)."""
    cap = loss.logit_softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)


@torch.no_grad()
def reference(model: QAdapterModel, features: list[dict], pad: int = PAD) -> dict:
    """The evaluation as first written: collated batches in order, two passes, full-vocabulary KL; the
    loss of all the pairs as one batch of those rewards (BT over the pairs, chi2 over the tokens)."""
    def batches(pairs):
        collate = PreferenceCollator(pad_token_id=pad)
        for start in range(0, len(features), pairs):
            batch = features[start : start + pairs]
            yield len(batch), collate(batch)

    model.eval()
    wins, margins, bt, chi2, tokens = [], [], [], [], []
    for pairs, inputs in batches(8):
        out = model(**inputs)
        wins.append(out.chosen_rewards > out.rejected_rewards)
        margins.append(out.chosen_rewards - out.rejected_rewards)
        bt.append(out.bt_loss.float() * pairs)
        tokens.append(int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()))
        chi2.append(out.chi2_loss.float() * tokens[-1])
    weight, loss = model.lm_head_weight, model.loss
    total, count = 0.0, 0
    for _, inputs in batches(4):
        base, q = model.hidden_states(inputs["input_ids"], inputs["attention_mask"])
        scored = inputs["labels"][:, 1:] != loss.ignore_index
        base, q = base[:, :-1][scored], q[:, :-1][scored]
        for s in range(0, base.shape[0], 256):
            z, zq = capped(base[s : s + 256] @ weight.T, loss), capped(q[s : s + 256] @ weight.T, loss)
            log_pi1 = torch.log_softmax(z.float(), dim=-1)
            log_pi = combine_logits(z, zq, alpha_tilde=loss.alpha_tilde, alpha_0=loss.alpha_0)
            total += (log_pi.exp() * (log_pi - log_pi1)).sum().item()
            count += z.shape[0]
    return {"accuracy": torch.cat(wins).float().mean().item(), "margin": torch.cat(margins).float().mean().item(),
            "loss": (torch.stack(bt).sum() / len(features) + torch.stack(chi2).sum() / sum(tokens)).item(),
            "kl_to_base": total / count}


def trained_like(base, seed: int = 1, **options) -> QAdapterModel:
    """A Q-Adapter whose LoRA B is random (as after training), so adapter and base differ."""
    model = QAdapterModel(base, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g))
    return model


def base_model(layout: str):
    if layout == "packed, eager attention":
        base = tiny_causal_lm("llama")
        base.set_attn_implementation("eager")
        return base
    if layout == "sequences packed whole (sliding window)":
        base = tiny_causal_lm("mistral")
        base.config.sliding_window = 6
        return base
    if layout == "soft-capped (Gemma-2)":
        return soft_capped_gemma2()
    return tiny_causal_lm("qwen2")


def soft_capped_gemma2():
    """A tiny Gemma-2 (cap 0.5) whose head is large enough that the cap bites: uncapped, its logits
    reach several times the cap."""
    base = tiny_causal_lm("gemma2")
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(40.0)
    return base


CASES = [  # every forward layout with the default loss options, and the other options on the packed one
    ("packed", {}),
    ("packed, eager attention", {}),
    ("sequences packed whole (sliding window)", {}),
    ("packed", {"reward_norm": "mean", "value_at": "next", "alpha_0": 0.3}),
    ("packed", {"reward_norm": "sum", "alpha_tilde": 0.7, "gamma": 0.9}),
    ("soft-capped (Gemma-2)", {}),
]


@pytest.mark.parametrize("layout, options", CASES)
def test_one_pass_gives_the_reference_numbers(layout, options):
    model = trained_like(base_model(layout), lora_dropout=0.3, **options)
    features = ragged_pairs(13, vocab=97)
    expected = reference(model, features)
    # A small token budget: several forward batches, none aligned with the groups of 8.
    got = evaluate_pairs(model, features, PAD, tokens_per_batch=150)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key


def test_a_model_with_its_own_ignore_index_is_measured_as_with_the_default():
    """The pairs are collated here, marking unscored positions with IGNORE_INDEX: the model's own
    ignore_index (how its training batches mark them) does not change which tokens are measured."""
    model = trained_like(base_model("padded"), reward_norm="mean")
    features = ragged_pairs(5, vocab=97)
    want = evaluate_pairs(model, features, PAD, pairs_per_batch=2)
    model.loss = dataclasses.replace(model.loss, ignore_index=-1)
    assert evaluate_pairs(model, features, PAD, pairs_per_batch=2) == want


@pytest.mark.skipif(not HH.is_file(), reason=f"the shared HH-RLHF sample is absent ({HH})")
def test_real_conversations_give_the_reference_numbers():
    """Multi-turn HH-RLHF pairs, prompts cut from the left, responses from the right."""
    import json

    tokenizer = tiny_chat_tokenizer()
    rows = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()[:11]]
    features, _ = tokenize_rows(rows, tokenizer, max_length=80, max_prompt_length=48, skip_invalid=True)
    model = trained_like(tiny_causal_lm("llama", vocab=len(tokenizer)))
    expected = reference(model, features, pad=tokenizer.pad_token_id)
    got = evaluate_pairs(model, features, tokenizer.pad_token_id)
    assert got == pytest.approx(expected, abs=1e-5, rel=1e-5)


def test_step0_baseline_is_a_fresh_adapter_on_the_same_base():
    features = ragged_pairs(11, vocab=97, seed=3)
    fresh = preference_metrics(QAdapterModel(tiny_causal_lm("llama"), lora_r=4), features, PAD)
    model = trained_like(tiny_causal_lm("llama"))  # the same frozen weights (seeded), a trained-looking adapter
    result = evaluate_pairs(model, features, PAD, step0=True, kl=False)
    assert result["step0"] == pytest.approx(fresh, abs=1e-5)
    assert result["accuracy"] != pytest.approx(fresh["accuracy"]) or result["loss"] != pytest.approx(fresh["loss"])


def test_a_soft_capped_model_gets_its_training_loss():
    """Every measure of a capped model is the training forward's, and the step-0 baseline a fresh
    adapter's training loss (an uncapped evaluation is far off: the cap bites)."""
    features = ragged_pairs(4, vocab=97, seed=7)
    model = QAdapterModel(soft_capped_gemma2())
    model.eval()
    training = model(**PreferenceCollator(pad_token_id=PAD)(features))
    got = evaluate_pairs(model, features, PAD, step0=True)
    assert got["loss"] == pytest.approx(training.loss.item(), rel=1e-5, abs=1e-5)
    assert got["step0"]["loss"] == pytest.approx(training.loss.item(), rel=1e-5, abs=1e-5)
    same = QAdapterModel(soft_capped_gemma2(), alpha_tilde=1.25, alpha_0=0.25)  # alpha~ = 1 + alpha_0
    assert evaluate_pairs(same, features, PAD)["kl_to_base"] == pytest.approx(0.0, abs=1e-6)  # pi~ = pi1
    model.loss = dataclasses.replace(model.loss, logit_softcap=None)
    assert evaluate_pairs(model, features, PAD)["loss"] != pytest.approx(got["loss"], rel=0.1)


def test_the_loss_is_the_whole_sets_whatever_the_groups():
    """With an exact reward norm, a pair's rewards do not depend on its group: the loss is that of all
    the pairs as one batch (chi2 a mean over all their tokens, not a pair-weighted mean of groups')."""
    model = trained_like(tiny_causal_lm("llama"), reward_norm="mean", beta=0.5)
    model.eval()
    features = ragged_pairs(7, vocab=97, seed=3)
    whole = model(**PreferenceCollator(pad_token_id=PAD)(features)).loss.item()
    for pairs_per_batch in (1, 3, 7):
        assert evaluate_pairs(model, features, PAD, pairs_per_batch=pairs_per_batch)["loss"] == pytest.approx(
            whole, rel=1e-5), pairs_per_batch


def test_batching_changes_no_number():
    model = trained_like(tiny_causal_lm("llama"))
    features = ragged_pairs(9, vocab=97, seed=5)
    one = evaluate_pairs(model, features, PAD, tokens_per_batch=1)  # one pair per forward
    everything = evaluate_pairs(model, features, PAD, tokens_per_batch=10**6)  # one forward
    assert one == pytest.approx(everything, abs=1e-5)
    preferences = {k: one[k] for k in ("accuracy", "margin", "loss")}
    assert preference_metrics(model, features, PAD) == pytest.approx(preferences)
    assert mean_kl(model, features, PAD) == pytest.approx(one["kl_to_base"], rel=1e-5)  # float32 sums in any order


def test_forward_batches_hold_their_token_budget_once_per_network():
    """Pairs of two 10-token sequences sharing 6: padded, a pair is 2 rows of 10 per network; packed,
    one row of 14. A stack runs more networks, so fewer pairs share a forward."""
    from qadapter.evaluation.measures import _length_batches

    features = [{"chosen_input_ids": [k] * 6 + [1] * 4, "rejected_input_ids": [k] * 6 + [2] * 4} for k in range(4)]
    sizes = {(pack, networks): [len(b) for b in _length_batches(features, 80, pack, networks)]
             for pack in (False, True) for networks in (2, 4)}
    assert sizes == {(False, 2): [2, 2], (False, 4): [1, 1, 1, 1], (True, 2): [2, 2], (True, 4): [1, 1, 1, 1]}
    assert [len(b) for b in _length_batches(features, 84, True, 2)] == [3, 1]


def test_progress_shows_pairs_and_rate_on_a_terminal_only(monkeypatch, capsys):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model = trained_like(tiny_causal_lm("llama"))
    evaluate_pairs(model, ragged_pairs(3, vocab=97), PAD, progress=True)
    assert capsys.readouterr().err == ""  # not a terminal
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    evaluate_pairs(model, ragged_pairs(3, vocab=97), PAD, progress=True, tokens_per_batch=1)
    assert "3/3 pairs" in terminal.getvalue() and "pairs/s" in terminal.getvalue()


@pytest.mark.parametrize("argument, value", [("pairs_per_batch", 0), ("tokens_per_batch", -1), ("chunk_size", 1.5)])
def test_bad_arguments_are_named(argument, value):
    model = trained_like(tiny_causal_lm("llama"))
    with pytest.raises(TypeError if isinstance(value, float) else ValueError, match=argument):
        evaluate_pairs(model, ragged_pairs(2, vocab=97), PAD, **{argument: value})
    with pytest.raises(ValueError, match="features"):
        evaluate_pairs(model, [], PAD)


def test_counts_flags_and_collections_of_other_types():
    """numpy counts and a generator or tuple of pairs measure as the ints and the list do; a string flag
    (the string "no" is true), a bool or float count and a lone question string (answered character by
    character) are refused naming the argument."""
    model = trained_like(tiny_causal_lm("llama"))
    pairs = ragged_pairs(4, vocab=97)
    want = evaluate_pairs(model, pairs, PAD, pairs_per_batch=2, tokens_per_batch=64, chunk_size=8)
    got = evaluate_pairs(model, (p for p in pairs), PAD, pairs_per_batch=np.int64(2),
                         tokens_per_batch=np.int64(64), chunk_size=np.int64(8))
    assert got == want and evaluate_pairs(model, tuple(pairs), PAD, pairs_per_batch=2, tokens_per_batch=64,
                                          chunk_size=8) == want
    for options, message in [({"kl": "no"}, "kl must be True or False; got 'no'"),
                             ({"per_pair": 1}, "per_pair must be True or False"),
                             ({"step0": None}, "step0 must be True or False"),
                             ({"pairs_per_batch": True}, "pairs_per_batch must be an integer >= 1; got True"),
                             ({"tokens_per_batch": 64.0}, "tokens_per_batch must be an integer >= 1; got 64.0")]:
        with pytest.raises((TypeError, ValueError), match=message):
            evaluate_pairs(model, pairs, PAD, **options)
    tokenizer = tiny_chat_tokenizer()
    model = trained_like(tiny_causal_lm("llama", vocab=len(tokenizer)))
    questions = ["the capital of France", "hello"]
    want = answers(model, tokenizer, questions, customized=True, max_new_tokens=2)
    assert answers(model, tokenizer, iter(questions), customized=True, max_new_tokens=2,
                   batch_size=np.int64(1)) == want
    for call, message in [({"questions": "hello"}, "questions must be a list of question strings; got str"),
                          ({"customized": "no"}, "customized must be True or False; got 'no'"),
                          ({"batch_size": 0}, "batch_size must be an integer >= 1; got 0"),
                          ({"batch_size": True}, "batch_size must be an integer >= 1; got True"),
                          ({"template_options": [("enable_thinking", False)]},
                           "template_options must be an object of named options; got"),
                          ({"template_options": []}, "template_options must be an object of named options; got")]:
        arguments = {"questions": questions, "customized": True, **call}
        with pytest.raises((TypeError, ValueError), match=message):
            answers(model, tokenizer, arguments.pop("questions"), max_new_tokens=2, **arguments)


def test_answers_end_at_every_eos_id_of_the_generation_config_without_a_pad_token():
    """Llama-3's generation config lists two EOS ids (end of text, end of turn) beside its tokenizer's
    one, and its tokenizer has no pad token: greedy answers stop where transformers' generate stops,
    and the caller's tokenizer is left as it was."""
    from qadapter.evaluation.measures import answers, chat_prompts

    tokenizer = tiny_chat_tokenizer()
    base = tiny_causal_lm("qwen2", vocab=len(tokenizer))
    question = "hello world"
    prompt = tokenizer(chat_prompts(tokenizer, [question]), return_tensors="pt", add_special_tokens=False)
    free = base.generate(**prompt, do_sample=False, max_new_tokens=8, eos_token_id=[tokenizer.eos_token_id],
                         pad_token_id=0)[0, prompt.input_ids.shape[1]:].tolist()
    end = next(t for k, t in enumerate(free[1:], 1) if t not in free[:k])  # a token the answer reaches, once
    base.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    tokenizer.pad_token = None
    want = tokenizer.decode(free[:free.index(end)], skip_special_tokens=True).strip()
    model = QAdapterModel(base, tokenizer=tokenizer)  # a fresh adapter: the policy is the base's
    side = tokenizer.padding_side
    for customized in (False, True):
        got = answers(model, tokenizer, [question, "the capital of France"], customized=customized, max_new_tokens=8)
        assert got[0] == want, customized
    assert tokenizer.pad_token is None and tokenizer.padding_side == side


def test_answers_and_the_probe_render_questions_with_the_adapters_template_options(monkeypatch):
    """An adapter trained with ``enable_thinking=False`` is asked, and its base beside it, with the
    prompt it was trained on; the probe's questions too, where the options are given."""
    from helpers import tiny_thinking_tokenizer
    from qadapter.evaluation.knowledge import loglik_accuracy
    from qadapter.evaluation.measures import answers, likelihood

    tokenizer, quiet = tiny_thinking_tokenizer(), {"enable_thinking": False}
    model = QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer=tokenizer, chat_template_kwargs=quiet)
    rendered = []
    render = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template",
                        lambda *a, **kw: rendered.append(render(*a, **kw)) or rendered[-1])
    for customized in (True, False):
        answers(model, tokenizer, ["hello world"], customized=customized, max_new_tokens=2)
    item = {"question": "hello world", "options": ["Paris", "Rome"], "answer": 0}
    loglik_accuracy(likelihood(model.peft_model), tokenizer, [item], quiet)
    assert len(rendered) > 2 and all("</think>" in text for text in rendered), rendered


def test_likelihoods_of_a_model_in_training_mode_drop_nothing_out():
    """The probe's and perplexity's log-probs of a model fresh from training (its LoRA dropout on):
    those of the model in eval mode, the same every call; the model is left training."""
    from qadapter.evaluation.measures import customized_likelihood, likelihood, perplexity

    tokenizer = tiny_chat_tokenizer()
    model = trained_like(tiny_causal_lm("llama", vocab=len(tokenizer)), lora_dropout=0.5)
    passages = ["the capital of France is Paris and hello world"]
    model.train()
    training = [perplexity(measure(m), tokenizer, passages) for measure, m in
                ((customized_likelihood, model), (likelihood, model.peft_model))]
    again = [perplexity(measure(m), tokenizer, passages) for measure, m in
             ((customized_likelihood, model), (likelihood, model.peft_model))]
    assert model.training and model.peft_model.training
    model.eval()
    evaluated = [perplexity(measure(m), tokenizer, passages) for measure, m in
                 ((customized_likelihood, model), (likelihood, model.peft_model))]
    assert training == again == pytest.approx(evaluated, rel=1e-6)


def test_answers_to_many_questions_are_tokenized_as_each_alone():
    """compare and the knowledge probe tokenize every answer in one call: each gets the tokens it
    gets alone, after its own question."""
    from helpers import LLAMA2, tiny_sentencepiece_tokenizer
    from qadapter.evaluation.measures import answer_tokens

    tokenizer = tiny_sentencepiece_tokenizer()
    tokenizer.chat_template = LLAMA2
    questions = ["the capital of France?", "two and two?", "the capital of France?"]
    replies = ["Paris", "four, of course", "Rome"]
    together = answer_tokens(tokenizer, questions, replies)
    assert together == [answer_tokens(tokenizer, [q], [r])[0] for q, r in zip(questions, replies)]
    assert len(set(map(tuple, together))) == 3
    assert answer_tokens(tokenizer, [], []) == []
    with pytest.raises(ValueError, match="questions and answers"):
        answer_tokens(tokenizer, questions, replies[:2])


# Qwen3's template without thinking: every answer opens with an empty think block.
QWEN3 = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n"
         "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
         "{% endif %}")


@pytest.mark.parametrize("kind", ["chatml", "chatml, qwen3", "chatml, thinking off", "sentencepiece, zephyr",
                                  "sentencepiece, llama-2", "no template"])
def test_an_answer_is_scored_as_training_tokenizes_it(kind):
    """The knowledge probe and compare score an answer after the chat prompt: its tokens are those the
    training pairs hold for it (a template that opens an answer with a space, Llama-2's, or with an
    empty think block, Qwen3's, where an answer "think" is not the block's, included; the template's
    options, Qwen3's enable_thinking, as training takes them)."""
    from helpers import LLAMA2, THINKING, tiny_sentencepiece_tokenizer
    from qadapter.evaluation.measures import answer_tokens, chat_prompts

    tokenizer = tiny_chat_tokenizer() if kind.startswith("chatml") else tiny_sentencepiece_tokenizer()
    tokenizer.chat_template = {"sentencepiece, llama-2": LLAMA2, "chatml, qwen3": QWEN3, "chatml, thinking off": THINKING,
                               "no template": None}.get(kind, tokenizer.chat_template)
    options = {"enable_thinking": False} if "thinking" in kind else None
    question, answers = "the capital of France?", ["think" if "qwen3" in kind else "Paris", "Rome is in Italy"]
    got = answer_tokens(tokenizer, [question] * len(answers), answers, options)
    (pair,), _ = tokenize_rows([{"prompt": question, "chosen": answers[0], "rejected": answers[1]}], tokenizer,
                               chat_template_kwargs=options)
    prompt = tokenizer(chat_prompts(tokenizer, [question], options), add_special_tokens=False).input_ids[0]
    assert ("</think>" in tokenizer.decode(prompt)) == (options is not None)
    for side, tokens, answer in zip(("chosen", "rejected"), got, answers):
        ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
        scored = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert ids[:len(ids) - len(scored)] == prompt  # the prompt as chat_prompts writes it
        assert scored[:len(tokens)] == tokens and len(scored) > len(tokens), (kind, side)  # then its end of turn
        assert answer not in tokenizer.decode(scored[len(tokens):]), (kind, side)  # and no more of the answer
