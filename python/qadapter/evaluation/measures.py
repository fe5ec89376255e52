"""Measures of a customization: does it prefer what it was taught, and how far did it move from the base?

- :func:`evaluate_pairs`: one pass over held-out pairs for everything below, and the step-0
  baseline: the same rewards for a fresh adapter (LoRA B = 0, so Q = the base's logits).
- :func:`preference_metrics`: held-out accuracy of the learned rewards (R_chosen > R_rejected),
  their mean margin and the mean loss.
- :func:`mean_kl`: mean per-token KL(customized || base) over response tokens, chunked so the
  vocabulary-sized rows exist a few hundred at a time.
- :func:`likelihood`: a plain model's log-probs of given next tokens (the base, a LoRA policy).
- :func:`answers`: greedy answers of the base model or of the customized policy, batched (also
  what the built-in task's pairs are made from).

The pass is built for a CPU. Pairs run longest first in batches of about ``tokens_per_batch``
tokens, so padding stays small; the batch runs packed as training runs it (its shared prompts once,
no padding: :mod:`qadapter.library.packing`); the frozen model and the adapter (for a stack, every level's
Q network) run in one forward of the batch repeated once per network
(:func:`qadapter.library.stack.level_rows`); the rewards, the step-0 rewards and the KL come from one
:func:`qadapter_kernels.vocabulary.vocabulary_pass` over the scored tokens' hidden states (a stack
takes one per measure: :func:`_level_measures`), with the model's loss options (its logit soft cap included). None of this changes a number: the rewards, and so the margins, are those of the
training loss on consecutive groups of ``pairs_per_batch`` pairs in the given order
(``reward_norm="padded"`` divides by a group's padded length), whatever batches the forward passes
ran in; the loss is the training loss of all the pairs as one batch of such rewards (the BT term a
mean over the pairs, chi2 over the scored tokens), as ``QAdapterTrainer.evaluate`` reports it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from qadapter_kernels import LossConfig
from qadapter_kernels.config import check_integer
from qadapter_kernels.inputs import check_chunk_size
from qadapter_kernels.pairwise import ScoredTokens, pairwise_loss, token_rewards
from qadapter_kernels.vocabulary import token_logprobs, vocabulary_pass

from ..library.data import (
    IGNORE_INDEX,
    PreferenceCollator,
    check_switch,
    check_template_options,
    text_start_token,
    tokenize_continuations,
)
from ..library.hidden import final_hidden, output_head
from ..library.model import QAdapterModel, evaluation_mode
from ..library.packing import common_prefix
from ..library.policy import end_token_ids
from ..library.stack import level_rows

STEP0_BASELINE = ("an untrained adapter (LoRA B = 0, so Q = the base's logits) on the same base under the same "
                  "rewards: the base's own preference, the baseline to beat")


def _forward_batch(model: QAdapterModel, batch: list[dict], pad_token_id: int):
    """Final hidden states ``[h_0, ..., h_L]`` of the frozen model and of each level's Q network (one
    adapter: ``[h_0, h_1]``) at each scored position of the loss's layout ``[chosen..., rejected...]``
    (row by row, the order the loss packs them in), the scored tokens' ids, and the layout's
    :class:`ScoredTokens`. One forward runs every level, each on its own copy of the rows, packed
    as training packs them where the model is padding-free (:mod:`qadapter.library.packing`)."""
    weight = model.lm_head_weight
    layout = PreferenceCollator(pad_token_id=pad_token_id)(batch)
    tokens = ScoredTokens.from_labels(layout["labels"].to(weight.device), IGNORE_INDEX)  # the collator's mark
    inputs = {"input_ids": layout["input_ids"], "attention_mask": layout["attention_mask"]}
    packed = model.packing()(*inputs.values()) if model.padding_free else None
    if packed is not None:
        inputs = {k: v for k, v in packed.inputs.items() if v is not None}
    rows = inputs["input_ids"].shape[0]
    networks = [(), *model.q_networks]  # the frozen model first
    repeated = {k: torch.cat([v] * len(networks)).to(weight.device) for k, v in inputs.items()}
    with level_rows(model.peft_model, networks, rows):
        hidden = model.base_model.get_decoder()(**repeated, use_cache=False).last_hidden_state
    sequence, position = tokens.mask.nonzero(as_tuple=True)
    targets = layout["labels"].to(weight.device)[:, 1:][tokens.mask]
    if packed is None:
        return [h[sequence, position] for h in hidden.split(rows)], targets, tokens
    return [packed.at(h, sequence, position) for h in hidden.split(rows)], targets, tokens


def _level_measures(model: QAdapterModel, levels: list[torch.Tensor], targets: torch.Tensor, *, step0: bool, kl: bool,
                    chunk_size: int | None):
    """The vocabulary pass's measures of one batch's levels (:func:`_forward_batch`): one pass for one
    adapter; a stack's step-0 rewards (Q of a fresh adapter: :meth:`QAdapterModel.step0_hidden`) and
    its KL to the base (:meth:`QAdapterModel.policy_hidden`) each take their own pair of hidden states."""
    weight, single = model.lm_head_weight, not model.stack
    base, q = model.loss_hidden(levels)
    wanted = ("stats", *(("step0",) if step0 and single else ()), *(("kl",) if kl and single else ()))
    out = vocabulary_pass(base, q, weight, targets, config=model.loss, measures=wanted, chunk_size=chunk_size)
    if single:
        return out
    if step0:
        fresh = vocabulary_pass(base, model.step0_hidden(levels), weight, targets, config=model.loss,
                                chunk_size=chunk_size)
        out = out._replace(step0_q_taken=fresh.q_taken, step0_value=fresh.value)
    if kl:
        frozen, policy, config = model.policy_hidden(levels)
        out = out._replace(kl=vocabulary_pass(frozen, policy, weight, config=config, measures=("kl",),
                                              chunk_size=chunk_size).kl)
    return out


def _length_batches(features: list[dict], tokens_per_batch: int, pack: bool, networks: int) -> list[list[int]]:
    """Pair indices, longest first, in batches whose rows, once per network (the frozen model and
    each level's Q network), hold about ``tokens_per_batch`` tokens with padding (at least one pair
    each); packed, a pair's two sequences take one row, their prompt once."""
    def width(f):
        c, r = f["chosen_input_ids"], f["rejected_input_ids"]
        return len(c) + len(r) - common_prefix(c, r) if pack else max(len(c), len(r))

    widths = [width(f) for f in features]
    rows_per_pair = networks * (1 if pack else 2)
    batches, current = [], []
    for index in sorted(range(len(features)), key=lambda i: -widths[i]):
        if current and (len(current) + 1) * rows_per_pair * widths[current[0]] > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(index)
    return batches + [current]


def _progress(total: int, show: bool):
    from tqdm import tqdm

    # disable=None: tqdm's own rule, shown only when stderr is a terminal. The rate stays in pairs/s
    # (tqdm would turn a slow one into s/pair).
    return tqdm(total=total, unit=" pairs", desc="evaluating", file=sys.stderr, disable=None if show else True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} pairs "
                           "[{elapsed}<{remaining}, {rate_noinv_fmt}]")


def _group_metrics(rewards: list[tuple[torch.Tensor, torch.Tensor]], features: list[dict], pad_token_id: int,
                   pairs_per_batch: int, config: LossConfig) -> dict:
    """Accuracy, margin and loss from per-token rewards (chosen, rejected) per pair, over consecutive
    groups of ``pairs_per_batch`` pairs, each group's rewards exactly those of a training batch of
    it; the loss's BT term is a mean over all pairs and its chi2 term over all scored tokens."""
    collate = PreferenceCollator(pad_token_id=pad_token_id)
    wins, margins, bt, chi2, tokens = [], [], [], [], []
    for start in range(0, len(features), pairs_per_batch):
        group = range(start, min(start + pairs_per_batch, len(features)))
        packed = torch.cat([rewards[i][0] for i in group] + [rewards[i][1] for i in group])
        labels = collate(features[group.start : group.stop])["labels"].to(packed.device)
        scored = ScoredTokens.from_labels(labels, IGNORE_INDEX)  # the collator's mark, whatever the model's
        out = pairwise_loss(packed, scored, config)
        wins.append(out.chosen_rewards > out.rejected_rewards)
        margins.append(out.chosen_rewards - out.rejected_rewards)
        bt.append(out.bt_loss.float() * len(group))
        count = int(scored.counts.sum())
        chi2.append(out.chi2_loss.float() * count)
        tokens.append(count)
    return {
        "accuracy": torch.cat(wins).float().mean().item(),
        "margin": torch.cat(margins).float().mean().item(),
        "loss": (torch.stack(bt).sum() / len(features) + torch.stack(chi2).sum() / max(sum(tokens), 1)).item(),
        "margins": torch.cat(margins).float().tolist(),
    }


def _listed(name: str, items, what: str) -> list:
    """``items`` (a list, a tuple, a generator, a data set) as a list, or a TypeError naming ``name``."""
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise TypeError(f"{name} must be a list of {what}; got {type(items).__name__}")
    return items if isinstance(items, list) else list(items)


@torch.no_grad()
def evaluate_pairs(model: QAdapterModel, features: list[dict], pad_token_id: int, *, kl: bool = True,
                   step0: bool = False, pairs_per_batch: int = 8, tokens_per_batch: int = 2048,
                   chunk_size: int | None = None,
                   progress: bool = False, per_pair: bool = False) -> dict:
    """Preference accuracy, margin and loss of tokenized pairs, with ``kl`` the mean per-token
    KL(customized || base) (``"kl_to_base"``), and with ``step0`` the same preference measures of the
    step-0 adapter (``"step0"``: LoRA B = 0, so Q = the base's logits): the baseline an untrained
    adapter scores under the same rewards. One forward per batch serves them all.

    ``pairs_per_batch`` defines the loss and margin (see the module's docstring);
    ``tokens_per_batch`` only sizes the forward passes and ``chunk_size`` the vocabulary-sized blocks
    (scored tokens per block); ``progress``: a progress bar on stderr when it is a terminal;
    ``per_pair``: also each pair's margin (``"margins"``, a list in the features' order).
    """
    features = _listed("features", features, "tokenized pairs")
    if not features:
        raise ValueError("features must hold at least one tokenized pair")
    pairs_per_batch, tokens_per_batch = (check_integer("pairs_per_batch", pairs_per_batch, least=1),
                                         check_integer("tokens_per_batch", tokens_per_batch, least=1))
    chunk_size = check_chunk_size(chunk_size)
    for name, flag in (("kl", kl), ("step0", step0), ("progress", progress), ("per_pair", per_pair)):
        check_switch(name, flag)
    loss = model.loss
    pack = model.padding_free
    learned, initial = [None] * len(features), [None] * len(features)
    kl_total, kl_count = 0.0, 0
    with evaluation_mode(model), _progress(len(features), progress) as bar:
        for indices in _length_batches(features, tokens_per_batch, pack, 1 + len(model.q_networks)):
            batch = [features[i] for i in indices]
            levels, targets, tokens = _forward_batch(model, batch, pad_token_id)
            measures = _level_measures(model, levels, targets, step0=step0, kl=kl, chunk_size=chunk_size)
            for store, stats in [(learned, (measures.q_taken, measures.value))] + (
                    [(initial, (measures.step0_q_taken, measures.step0_value))] if step0 else []):
                per_sequence = token_rewards(*stats, tokens, loss).split(tokens.counts.tolist())
                for k, i in enumerate(indices):
                    store[i] = (per_sequence[k], per_sequence[k + len(indices)])
            if kl:
                kl_total += measures.kl.sum().item()
            kl_count += targets.shape[0]
            bar.update(len(indices))
    result = _group_metrics(learned, features, pad_token_id, pairs_per_batch, loss)
    if not per_pair:
        del result["margins"]
    if kl:
        result["kl_to_base"] = kl_total / max(kl_count, 1)
    if step0:
        result["step0"] = _group_metrics(initial, features, pad_token_id, pairs_per_batch, loss)
        if not per_pair:
            del result["step0"]["margins"]
    return result


def preference_metrics(model, features: list[dict], pad_token_id: int, *, pairs_per_batch: int = 8) -> dict:
    """Accuracy and mean margin of the learned rewards, and the mean loss, on tokenized pairs."""
    return evaluate_pairs(model, features, pad_token_id, kl=False, pairs_per_batch=pairs_per_batch)


def pair_margins(model, features: list[dict], pad_token_id: int) -> torch.Tensor:
    """Each pair's learned reward margin (chosen - rejected), ``[pairs]``."""
    return torch.tensor(evaluate_pairs(model, features, pad_token_id, kl=False, per_pair=True)["margins"])


def mean_kl(model, features: list[dict], pad_token_id: int, *, chunk_size: int | None = None) -> float:
    """Mean per-token KL(pi~ || pi1) at the scored positions of the given pairs (both responses)."""
    return evaluate_pairs(model, features, pad_token_id, chunk_size=chunk_size)["kl_to_base"]


class Targets(NamedTuple):
    """Scored next tokens of a batch, packed: position ``positions[i]`` of row ``rows[i]`` predicts
    ``ids[i]`` (a packed row may score several targets at one position)."""

    rows: torch.Tensor
    positions: torch.Tensor
    ids: torch.Tensor

    def to(self, device) -> Targets:
        return Targets(*(x.to(device) for x in self))

    def row_sums(self, values: torch.Tensor, rows: int) -> torch.Tensor:
        """Per-row sums ``[rows]`` of one value per target."""
        return torch.zeros(rows, dtype=values.dtype, device=values.device).index_add_(0, self.rows.to(values.device),
                                                                                      values)


def next_token_targets(labels: torch.Tensor) -> Targets:
    """The targets of labels aligned with the inputs: position ``t`` predicts ``labels[t + 1]`` where
    that is not ``IGNORE_INDEX``."""
    scored = labels[:, 1:] != IGNORE_INDEX
    rows, positions = scored.nonzero(as_tuple=True)
    return Targets(rows, positions, labels[:, 1:][scored])


def likelihood(model, *, padding_free: bool = True) -> Callable:
    """``fn(input_ids, attention_mask, position_ids, targets: Targets) -> [targets]``: a plain causal
    LM's log-probs of given next tokens (adapters as the caller set them; in eval mode), from its hidden states at
    the scored positions and its head, soft cap included, with no ``[B, T, V]`` logits; a batch
    without ``position_ids`` runs packed (``padding_free``, :func:`qadapter.library.hidden.final_hidden`)."""
    weight, cap = output_head(model)

    @torch.no_grad()
    def target_logprobs(input_ids, attention_mask, position_ids, targets: Targets):
        device = weight.device
        with evaluation_mode(model):  # a model fresh from training still drops out
            hidden = final_hidden(model, input_ids.to(device), attention_mask.to(device), padding_free=padding_free,
                                  position_ids=None if position_ids is None else position_ids.to(device))
        targets = targets.to(device)
        return token_logprobs(hidden[targets.rows, targets.positions], weight, targets.ids, logit_softcap=cap)

    return target_logprobs


def customized_likelihood(model: QAdapterModel) -> Callable:
    """:func:`likelihood`'s contract for the customized policy ``pi~`` of a :class:`QAdapterModel`:
    both passes' hidden states at the scored positions through the one vocabulary pass."""
    weight = model.lm_head_weight

    @torch.no_grad()
    def target_logprobs(input_ids, attention_mask, position_ids, targets: Targets):
        device = weight.device
        with evaluation_mode(model):
            base_hidden, q_hidden = model.hidden_states(
                input_ids.to(device), attention_mask.to(device),
                position_ids=None if position_ids is None else position_ids.to(device))
        at = targets.to(device)
        return vocabulary_pass(base_hidden[at.rows, at.positions], q_hidden[at.rows, at.positions], weight, at.ids,
                               config=model.loss, measures=("logprobs",)).combined

    return target_logprobs


def perplexity(target_logprobs: Callable, tokenizer, passages: list[str]) -> float:
    """exp of the mean negative log-likelihood per token of plain passages (one at a time), under a
    model given as its target log-probs (:func:`likelihood`, :func:`customized_likelihood`)."""
    nll, count = 0.0, 0
    for text in passages:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        nll -= float(target_logprobs(ids, torch.ones_like(ids), None, next_token_targets(ids)).sum())
        count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))


def chat_prompts(tokenizer, questions: list[str], template_options: dict | None = None) -> list[str]:
    """Each question as a chat's user turn, ready for the answer, by the tokenizer's chat template
    (given ``template_options``: an adapter's ``chat_template_kwargs``), to be tokenized without
    special tokens; a tokenizer without a template (a base model's) takes the question as plain text,
    as training takes such a prompt (after the BOS it starts texts with)."""
    template_options = check_template_options(template_options, "template_options")
    if getattr(tokenizer, "chat_template", None) is None:
        start = tokenizer.bos_token if text_start_token(tokenizer) is not None else ""
        return [start + q for q in questions]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True,
                                          **template_options) for q in questions]


def answer_tokens(tokenizer, questions: list[str], answers: list[str],
                  template_options: dict | None = None) -> list[list[int]]:
    """The tokens of each of ``answers`` as it follows its question of ``questions`` (side by side),
    rendered by ``chat_prompts``, in the conversation the chat template writes (a template may open an
    answer with a space, Llama-2's, or trim it), without its end of turn: the tokens training scores
    for it. Without a template, or where the template does not write the answer after that prompt,
    the answer as given. One tokenizer call for all: compare and the knowledge probe score many."""
    if len(questions) != len(answers):
        raise ValueError(f"questions and answers must pair up; got {len(questions)} questions and "
                         f"{len(answers)} answers")
    texts = list(answers)
    if getattr(tokenizer, "chat_template", None) is not None:
        distinct = list(dict.fromkeys(questions))
        prompts = dict(zip(distinct, chat_prompts(tokenizer, distinct, template_options)))

        def rendered(question: str, answer: str) -> str:
            return tokenizer.apply_chat_template([{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}], tokenize=False,
                                                 **(template_options or {}))

        # Where the template writes an answer's text: past what it opens every answer with (Qwen3's
        # empty <think></think>, in which an answer "think" would otherwise be found).
        opening = {q: rendered(q, "\x00").find("\x00", len(prompts[q])) for q in distinct}
        for k, (question, answer) in enumerate(zip(questions, answers)):
            prompt, whole = prompts[question], rendered(question, answer)
            core = answer.strip() or answer
            at = whole.find(core, max(opening[question], len(prompt))) if whole.startswith(prompt) else -1
            if at >= 0:
                texts[k] = whole[len(prompt):at + len(core)]
    return tokenize_continuations(tokenizer, texts)


@torch.no_grad()
def answers(model, tokenizer, questions: list[str], *, customized: bool, max_new_tokens: int = 48,
            batch_size: int = 16, template_options: dict | None = None) -> list[str]:
    """Greedy answers to chat questions (left-padded batches): of the customized policy of a
    :class:`QAdapterModel`, or with ``customized=False`` of its frozen base model; a plain
    transformers causal LM is its own base model (``customized=False`` only). The questions are
    rendered with ``template_options``, by default a :class:`QAdapterModel`'s ``chat_template_kwargs``
    (its base answers the same prompts)."""
    questions = _listed("questions", questions, "question strings")
    check_switch("customized", customized)
    batch_size = check_integer("batch_size", batch_size, least=1)
    if isinstance(model, QAdapterModel):
        if template_options is None:
            template_options = model.chat_template_kwargs
        if not customized:
            with model.peft_model.disable_adapter():
                return answers(model.base_model, tokenizer, questions, customized=False,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, template_options=template_options)
    elif customized:
        raise TypeError(f"customized answers need a QAdapterModel; got {type(model).__name__}")
    device = (model.lm_head_weight if customized else model.get_output_embeddings().weight).device
    ends = end_token_ids(model.base_model if customized else model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]  # Llama's has none
    out_texts = []
    with evaluation_mode(model):
        for start in range(0, len(questions), batch_size):
            prompts = tokenizer(chat_prompts(tokenizer, questions[start : start + batch_size], template_options),
                                add_special_tokens=False)["input_ids"]
            width = max(map(len, prompts))  # left-padded by hand: the caller's tokenizer stays as it is
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            # The same call for QAdapterModel.generate and transformers' generate.
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=ends, pad_token_id=pad)
            for row in out[:, width:].tolist():
                answer = next((row[:k] for k, token in enumerate(row) if token in ends), row)  # its end left out
                out_texts.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    return out_texts
