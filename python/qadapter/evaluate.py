"""Measures of a customization: does it prefer what it was taught, and how far did it move from the base?

- :func:`preference_metrics`: held-out accuracy of the learned rewards (R_chosen > R_rejected).
- :func:`mean_kl`: mean per-token KL(customized || base) over response tokens, chunked so the
  vocabulary-sized rows exist a few hundred at a time.
- :func:`answers`: greedy answers of the base model or of the customized policy, batched (also
  what the built-in task's pairs are made from).
"""

from __future__ import annotations

import torch

from qadapter_kernels import combine_logits

from .data import PreferenceCollator
from .model import QAdapterModel, evaluation_mode


def _collated_batches(features: list[dict], pad_token_id: int, pairs: int, device: torch.device):
    """``(pairs in the batch, model inputs on device)`` in the loss's ``[chosen..., rejected...]`` layout."""
    collate = PreferenceCollator(pad_token_id=pad_token_id)
    for start in range(0, len(features), pairs):
        batch = features[start : start + pairs]
        yield len(batch), {k: v.to(device) for k, v in collate(batch).items()}


@torch.no_grad()
def preference_metrics(model, features: list[dict], pad_token_id: int, *, pairs_per_batch: int = 8) -> dict:
    """Accuracy and mean margin of the learned rewards, and the mean loss, on tokenized pairs."""
    wins, margins, losses = [], [], []
    with evaluation_mode(model):
        for pairs, inputs in _collated_batches(features, pad_token_id, pairs_per_batch, model.lm_head_weight.device):
            out = model(**inputs)
            wins.append(out.chosen_rewards > out.rejected_rewards)
            margins.append(out.chosen_rewards - out.rejected_rewards)
            losses.append(out.loss.float() * pairs)
    return {
        "accuracy": torch.cat(wins).float().mean().item(),
        "margin": torch.cat(margins).float().mean().item(),
        "loss": (torch.stack(losses).sum() / len(features)).item(),
    }


@torch.no_grad()
def mean_kl(model, features: list[dict], pad_token_id: int, *, pairs_per_batch: int = 4, chunk: int = 256) -> float:
    """Mean per-token KL(pi~ || pi1) at the scored positions of the given pairs (both responses)."""
    loss, weight = model.loss, model.lm_head_weight
    total, count = 0.0, 0
    with evaluation_mode(model):
        for _, inputs in _collated_batches(features, pad_token_id, pairs_per_batch, weight.device):
            base, q = model.hidden_states(inputs["input_ids"], inputs["attention_mask"])
            scored = inputs["labels"][:, 1:] != loss.ignore_index
            base, q = base[:, :-1][scored], q[:, :-1][scored]
            for s in range(0, base.shape[0], chunk):
                z = base[s : s + chunk] @ weight.T
                log_pi1 = torch.log_softmax(z.float(), dim=-1)
                log_pi = combine_logits(z, q[s : s + chunk] @ weight.T, alpha_tilde=loss.alpha_tilde,
                                        alpha_0=loss.alpha_0)
                total += (log_pi.exp() * (log_pi - log_pi1)).sum().item()
                count += z.shape[0]
    return total / max(count, 1)


def chat_prompts(tokenizer, questions: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


@torch.no_grad()
def answers(model, tokenizer, questions: list[str], *, customized: bool, max_new_tokens: int = 48,
            batch_size: int = 16) -> list[str]:
    """Greedy answers to chat questions (left-padded batches): of the customized policy of a
    :class:`QAdapterModel`, or with ``customized=False`` of its frozen base model; a plain
    transformers causal LM is its own base model (``customized=False`` only)."""
    if isinstance(model, QAdapterModel):
        if not customized:
            with model.peft_model.disable_adapter():
                return answers(model.base_model, tokenizer, questions, customized=False,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    elif customized:
        raise TypeError(f"customized answers need a QAdapterModel; got {type(model).__name__}")
    tokenizer.padding_side = "left"
    device = (model.lm_head_weight if customized else model.get_output_embeddings().weight).device
    out_texts = []
    with evaluation_mode(model):
        for start in range(0, len(questions), batch_size):
            enc = tokenizer(chat_prompts(tokenizer, questions[start : start + batch_size]), return_tensors="pt",
                            padding=True, add_special_tokens=False).to(device)
            # The same call for QAdapterModel.generate and transformers' generate.
            out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc.input_ids.shape[1] :]:
                out_texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out_texts
