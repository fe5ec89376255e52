"""Paths only a CUDA device takes, each against its eager or CPU twin: torch.compile through the
CUDA custom ops and the Triton chunked backend (separate and shared heads), the model layer on CUDA (training forward,
bfloat16, padding-free passes through CUDA's attention kernels, cached generation through the Triton decode combine) and serving on CUDA (an adapter set with a stack,
echoed prompts, compiled decoding, the engine's running batch, its prefix cache)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("peft")

from helpers import (  # noqa: E402
    assert_compiled_matches_eager,
    decode_joining_and_leaving,
    engine_decode,
    left_padded_prompts,
    make_inputs,
    make_model,
    plain_greedy,
    preference_batch,
    save_three_level_stack,
    shared_prompt_pairs,
    tiny_causal_lm,
    tiny_chat_tokenizer,
)

from qadapter_kernels import qadapter_loss, registry  # noqa: E402

TRAINABLE = ("q_hidden", "q_weight", "q_bias")


def require(backend: str) -> None:
    status = registry.status(backend)
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")


@pytest.mark.parametrize("backend", ["cuda", "chunked-triton"])
def test_compiled_step_matches_eager_on_gpu(backend):
    """torch.compile traces the step through the backend's ops (custom ops for ``cuda``)."""
    require(backend)
    x = make_inputs(batch=4, seq=33, hidden=64, vocab=1000, seed=5, q_head=True, q_bias=True, device="cuda")

    def step(base_hidden, q_hidden, weight, labels, q_weight, q_bias):
        return qadapter_loss(base_hidden, q_hidden, weight, labels, q_weight=q_weight, q_bias=q_bias,
                             backend=backend, chunk_size=48, value_at="next").loss

    args = [x[k] for k in ("base_hidden", "q_hidden", "weight", "labels", "q_weight", "q_bias")]
    trainable = [x[k] for k in TRAINABLE]
    assert_compiled_matches_eager(step, args, trainable, value_tol=(1e-5, 1e-6), grad_tol=(1e-4, 1e-6))


@pytest.mark.parametrize("backend", ["cuda", "chunked-triton"])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_compiled_shared_head_step_matches_eager_on_gpu(backend, softcap):
    """The shared (frozen, tied) head under torch.compile: one stacked GEMM written with ``mm(out=)``
    into views of the buffer every chunk reuses, then the row step overwriting ``q``, a view of that
    buffer, in place (``qadapter::row_step_`` for ``cuda``); three chunks, so the buffer is reused.
    With Gemma-2's soft cap too, whose tanh rewrites the same views."""
    require(backend)
    x = make_inputs(batch=4, seq=33, hidden=64, vocab=1000, seed=6, device="cuda")

    def step(base_hidden, q_hidden, weight, labels):
        return qadapter_loss(base_hidden, q_hidden, weight, labels, backend=backend, chunk_size=24,
                             logit_softcap=softcap).loss

    args = [x[k] for k in ("base_hidden", "q_hidden", "weight", "labels")]
    assert_compiled_matches_eager(step, args, [x["q_hidden"]], value_tol=(1e-5, 1e-6), grad_tol=(1e-4, 1e-6))


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().cpu() for n, p in model.peft_model.named_parameters() if p.grad is not None}


def test_model_training_forward_on_gpu_matches_cpu():
    """The same adapter and batch: the loss and every LoRA gradient agree between CPU and CUDA."""
    ids, mask, labels = preference_batch(vocab=97, seq=24)
    results = {}
    for device in ("cpu", "cuda"):
        model = make_model(lora_dropout=0.0).to(device)
        model.train()
        loss = model(ids.to(device), mask.to(device), labels.to(device)).loss
        loss.backward()
        results[device] = (loss.detach().cpu(), lora_grads(model))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results["cpu"], results["cuda"]
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-4, atol=1e-5)
    assert cpu_grads.keys() == gpu_grads.keys() and cpu_grads
    for name in cpu_grads:
        torch.testing.assert_close(gpu_grads[name], cpu_grads[name], rtol=2e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("gemma2", "eager")])
def test_padding_free_step_on_gpu_matches_the_padded_one(family, attention, dtype):
    """Packed rows (sdpa's boolean tree mask, eager's additive one) through CUDA's attention kernels:
    the loss and LoRA gradient of the padded step, within the dtype's rounding. Every prompt starts
    alike (a system prompt), so the batch packs into several capped trees."""
    from qadapter import PreferenceCollator

    model = make_model(family, lora_dropout=0.0).to("cuda", dtype)
    model.base_model.config._attn_implementation = attention
    batch = {k: v.cuda() for k, v in PreferenceCollator(pad_token_id=0)(
        shared_prompt_pairs(6, seed=7, system=(1, 2, 1))).items()}
    results = []
    for flag in (False, True):
        model.padding_free = flag
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = torch.cat([g.flatten() for g in lora_grads(model).values()])
        results.append((loss.detach().float().cpu(), grads))
    (loss, grads), (packed_loss, packed_grads) = results
    # Other GEMM shapes and summation orders: rounding only (on a CPU, bf16 moves the gradient 0.5%).
    loss_tolerance, gradient_tolerance = (1e-5, 1e-4) if dtype == torch.float32 else (3e-2, 5e-2)
    assert abs(float(packed_loss - loss)) <= loss_tolerance * max(1.0, abs(float(loss)))
    assert float((packed_grads - grads).norm() / grads.norm()) <= gradient_tolerance


def test_model_bfloat16_on_gpu_is_close_to_float32():
    ids, mask, labels = preference_batch(vocab=97, seq=24)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(lora_dropout=0.0).to("cuda", dtype)
        model.train()
        losses[dtype] = model(ids.cuda(), mask.cuda(), labels.cuda()).loss.float().item()
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) <= 3e-2 * max(1.0, abs(losses[torch.float32])), losses


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cached_generation_on_gpu_matches_plain_loop(compiled):
    """Cached decoding gives the tokens of the eager re-running loop: eager through the backend's
    Triton combine, compiled (CUDA's default: static cache, CUDA graphs) through the traced one."""
    model = make_model().to("cuda")
    ids, mask = left_padded_prompts()
    ids, mask = ids.cuda(), mask.cuda()
    out = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], compiled=compiled)
    assert torch.equal(out, plain_greedy(model, ids, mask, 12))


def test_served_stacks_on_gpu_match_cpu(tmp_path):
    """An adapter set on CUDA serving a single adapter and a three-level stack over one base, in a
    batch with the base: next-token and echoed-prompt log-probs as on the CPU; the compiled decoding
    (CUDA's default) gives the eager tokens; the engine's requests joining and leaving the running
    batch decode as alone."""
    from qadapter.library.adapter_set import AdapterSet
    from transformers import DynamicCache

    levels = save_three_level_stack(tmp_path, tiny_causal_lm)
    paths = {"a": levels[0], "b": levels[2]}
    ids, mask = left_padded_prompts(lengths=(7, 4, 9, 5))
    names, top = ["b", None, "a", "b"], [2, 1, None, 3]
    sets, read = {}, {}
    for device in ("cpu", "cuda"):
        sets[device] = AdapterSet.from_pretrained(paths, tiny_causal_lm().to(device))
        sets[device].peft_model.eval()
        read[device] = sets[device].read_prompts(ids.to(device), mask.to(device), names, DynamicCache(), top=top)
    (cpu_next, cpu_scores), (gpu_next, gpu_scores) = read["cpu"], read["cuda"]
    torch.testing.assert_close(gpu_next.cpu(), cpu_next, rtol=1e-4, atol=1e-4)
    assert [s is None for s in gpu_scores] == [s is None for s in cpu_scores] == [t is None for t in top]
    for row, (gpu_row, cpu_row) in enumerate(zip(gpu_scores, cpu_scores)):
        if cpu_row is not None:
            torch.testing.assert_close(gpu_row.combined.cpu(), cpu_row.combined, rtol=1e-4, atol=1e-4, msg=str(row))
            torch.testing.assert_close(gpu_row.top_logprobs.cpu(), cpu_row.top_logprobs, rtol=1e-4, atol=1e-4)

    gpu = sets["cuda"]
    options = dict(adapters=names, max_new_tokens=6, eos_token_id=[], do_sample=False)
    eager = gpu.generate(ids.cuda(), mask.cuda(), compiled=False, **options)
    assert torch.equal(gpu.generate(ids.cuda(), mask.cuda(), **options), eager)  # compiled: CUDA's default
    decode_joining_and_leaving(gpu)


def test_prefix_cache_on_gpu_reads_a_next_turn_as_alone(tmp_path):
    """A stack's next chat turn on CUDA, read after its stored prefix, decodes as it does read whole."""
    from qadapter.library.adapter_set import AdapterSet
    from qadapter.serving.engine import Engine, Request

    levels = save_three_level_stack(tmp_path, tiny_causal_lm)
    served = AdapterSet.from_pretrained({"b": levels[2]}, tiny_causal_lm().to("cuda"))
    served.peft_model.eval()
    engine, tokenizer = Engine(served, tiny_chat_tokenizer(), prefix_cache_bytes=1 << 20), tiny_chat_tokenizer()

    def decoded(engine, prompt):
        request = Request(prompt=prompt, adapter="b", max_tokens=6, emit=lambda event: None)
        engine_decode(engine, [request])
        return request

    first = decoded(engine, [5, 17, 33, 8, 21])
    turn = first.prompt + first.tokens + [9, 14]
    assert decoded(engine, turn).tokens == decoded(Engine(served, tokenizer), turn).tokens
    assert engine.metrics.prefix_cache_hits._value.get() == len(first.prompt) + len(first.tokens) - 1
