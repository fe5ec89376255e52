"""A tiny random causal LM, a word-level tokenizer and a synthetic preference task, so that every recipe
in this folder runs in seconds on a CPU with nothing downloaded. Swap in your own model, tokenizer
and data: the recipes do not depend on anything here.

The task: a prompt of random words; the chosen response draws its words from the lower half of the
vocabulary, the rejected one from the upper half. Word ``w<i>`` is token ``i``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

VOCAB = 1000
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # token ids 0..3
PAD_ID, EOS_ID = 0, 2


def tiny_causal_lm(vocab: int = VOCAB, seed: int = 0):
    """A randomly initialised Llama-architecture model with a plain linear lm_head."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=EOS_ID,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def lora_config():
    """The Q-Adapter method's LoRA (rank 8, alpha 16 on q_proj and v_proj), without dropout so runs repeat."""
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def tiny_peft_model(vocab: int = VOCAB, seed: int = 0):
    """The model a user brings: a causal LM with a fresh LoRA adapter."""
    from peft import get_peft_model

    return get_peft_model(tiny_causal_lm(vocab, seed), lora_config())


def token_pairs(n: int = 8, prompt_len: int = 8, response_len: int = 40, vocab: int = VOCAB, seed: int = 0):
    """``n`` pairs as token ids: ``(prompt, chosen, rejected)`` lists, responses ending with EOS."""
    g = torch.Generator().manual_seed(seed)
    half = (vocab + len(SPECIALS)) // 2
    out = []
    for _ in range(n):
        prompt = torch.randint(len(SPECIALS), vocab, (prompt_len,), generator=g).tolist()
        chosen = torch.randint(len(SPECIALS), half, (response_len,), generator=g).tolist() + [EOS_ID]
        rejected = torch.randint(half, vocab, (response_len,), generator=g).tolist() + [EOS_ID]
        out.append((prompt, chosen, rejected))
    return out


def tokenized_pairs(**kwargs) -> list[dict]:
    """:func:`token_pairs` as the features ``qadapter.PreferenceCollator`` stacks: prompt and response
    ids, with labels that score the response only."""
    features = []
    for prompt, chosen, rejected in token_pairs(**kwargs):
        row = {}
        for name, response in (("chosen", chosen), ("rejected", rejected)):
            row[f"{name}_input_ids"] = prompt + response
            row[f"{name}_labels"] = [-100] * len(prompt) + response
        features.append(row)
    return features


def tokenizer(vocab: int = VOCAB):
    """Word-level: ``w<i>`` is token ``i``; the special tokens are matched anywhere in the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {name: i for i, name in enumerate(SPECIALS)}
    words.update({f"w{i}": i for i in range(len(SPECIALS), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def text_pairs(**kwargs) -> list[dict]:
    """:func:`token_pairs` as text rows ``{"prompt", "chosen", "rejected"}`` (responses without EOS:
    preference trainers append it)."""

    def words(ids):
        return " ".join(f"w{i}" for i in ids if i != EOS_ID)

    pairs = token_pairs(**kwargs)
    return [{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)} for p, c, r in pairs]


def run_from_command_line(run, doc: str, argv: list[str] | None = None) -> None:
    """An example's command line: ``--steps N``, then the loss of each step."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    _, losses = run(parser.parse_args(argv).steps)
    for step, value in enumerate(losses, start=1):
        print(f"step {step}: loss {value:.4f}")
    if torch.distributed.is_initialized():  # one of several processes (`accelerate launch`, torchrun)
        leave_process_group()


def leave_process_group() -> None:
    """Ends a launched process once every rank is done, without the interpreter's shutdown: a gloo
    thread may still be freeing a collective (a ZeRO-3 parameter prefetch) when it starts, and that
    aborts the process ("terminate called without an active exception"), failing the launch."""
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
