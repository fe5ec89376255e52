"""End to end: one Q-Adapter training step of a real architecture, with the fused loss and with the
authors' eager formulation.

The model is built here from a real configuration with random weights (no hub is reachable, and
the device machine cannot receive real weights): a ``LlamaForCausalLM`` plus a PEFT LoRA adapter
as the authors use it (r=8, alpha=16, dropout 0.05 on q_proj and v_proj). A step is what a
Q-Adapter trainer does per batch:

    base forward, adapter disabled, no grad -> base_hidden
    adapter forward                         -> q_hidden
    loss(base_hidden, q_hidden, lm_head.weight, labels); backward; AdamW step

Only the decoder runs (``last_hidden_state``): calling the causal-LM wrapper would build the
``[B, T, V]`` logits itself and hide the difference the loss makes. The loss is a swappable
callable with ``qadapter_loss``'s signature, so exactly one thing differs between the variants.
It is built from transformers and peft directly, not from ``qadapter.library.model``, to measure the
loss alone and not the model layer's own choices.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.baselines import eager_authors_loss
from bench.common import GIB, Timer, first_line, is_oom, release, sync
from bench.memory import peak_extra_memory
from qadapter_kernels import qadapter_loss
from qadapter_kernels.registry import resolve

# Real architectures (public config.json values); random weights. rope scaling is left out: it
# changes no shape and no cost.
MODELS = {
    "smollm2-135m": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
        rms_norm_eps=1e-5, max_position_embeddings=8192,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072,
    ),
    # Not a model: seconds-long, for the CI smoke test of the report.
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512,
    ),
}
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
BUDGET_24GB = 24 * GIB


def default_model(device: torch.device) -> str:
    return "llama-3.1-8b" if device.type == "cuda" else "smollm2-135m"


def default_seq(device: torch.device) -> int:
    # GPU: 2 pairs x 1024 tokens, a usual preference-training length. CPU: 2 pairs x 128, since a
    # 30-layer forward of 1024 tokens alone takes 3-12 s on 2 (shared) cores.
    return 1024 if device.type == "cuda" else 128


def default_repeats(device: torch.device) -> int:
    return 3 if device.type == "cuda" else 1


@dataclass
class E2EResult:
    """One loss variant's training step. Bytes: ``resident`` = weights + optimizer state;
    ``peak_extra`` = the step's peak above that; ``fits_24gb`` only measured on CUDA."""

    loss: str
    status: str
    reason: str = ""
    backend: str = ""
    times_s: list[float] = field(default_factory=list)
    resident_bytes: int | None = None
    peak_extra_bytes: int | None = None
    fits_24gb: bool | None = None

    @property
    def time_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None


def build_model(name: str, device: torch.device, dtype: torch.dtype, *, checkpointing: bool, seed: int = 0):
    """Random-initialized ``LlamaForCausalLM`` of a real config, with the authors' LoRA; in train mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**MODELS[name], attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    if checkpointing:  # transformers 5.23 renamed it; the device machine may have an older one
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    return model


def make_batch(vocab: int, pairs: int, seq: int, device: torch.device, seed: int = 0):
    """Random token ids; the first quarter of every row is prompt (not scored), as in preference data."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * pairs, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def training_step(model, optimizer, loss_fn: Callable, ids, attention_mask, labels) -> Callable[[], None]:
    """The step closure (see the module docstring)."""
    decoder = model.get_base_model().model  # LlamaModel, LoRA layers injected in place
    head = model.get_base_model().get_output_embeddings().weight  # frozen (tied on SmolLM2)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad(), model.disable_adapter():
            base_hidden = decoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        q_hidden = decoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        loss_fn(base_hidden, q_hidden, head, labels).loss.backward()
        optimizer.step()
        sync(ids.device)

    return step


def _fits(step: Callable[[], None], device: torch.device, budget: int) -> bool:
    """Whether one more step runs with the allocator capped at ``budget`` bytes in all."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    try:
        step()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def run_e2e(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    seq: int,
    pairs: int = 2,
    repeats: int = 2,
    checkpointing: bool | None = None,
) -> dict:
    """Times and sizes the training step with the fused loss and with the eager-authors loss.

    Both variants train the same model (each with its own AdamW); their timed steps alternate so
    that load drift on a shared machine favours neither. ``checkpointing`` defaults to on for CUDA
    (the memory-frugal set-up the 24 GB question is about) and off on CPU (time).
    """
    checkpointing = device.type == "cuda" if checkpointing is None else checkpointing
    model = build_model(name, device, dtype, checkpointing=checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids, attention_mask, labels = make_batch(MODELS[name]["vocab_size"], pairs, seq, device)
    variants = {"fused": qadapter_loss, "eager-authors": eager_authors_loss}
    runs = []  # (result, step, optimizer)
    for loss_name, loss_fn in variants.items():
        optimizer = torch.optim.AdamW(trainable, lr=3e-4)
        result = E2EResult(loss_name, "ok", backend=resolve("auto", device).name if loss_fn is qadapter_loss else "")
        step = training_step(model, optimizer, loss_fn, ids, attention_mask, labels)
        # The warm-up also creates the optimizer state, which then counts as resident.
        if _guarded(result, optimizer, device, step):
            result.resident_bytes = _tensor_bytes(
                [*model.parameters(), *model.buffers(), *(v for s in optimizer.state.values() for v in s.values())]
            )
        runs.append((result, step, optimizer))
    timer = Timer(device)
    for _ in range(repeats):
        for result, step, optimizer in runs:
            if result.status == "ok":
                _guarded(result, optimizer, device, lambda: result.times_s.extend(timer.times_s(step, 1)))
    for result, step, optimizer in runs:
        if result.status == "ok":
            _guarded(result, optimizer, device,
                     lambda: setattr(result, "peak_extra_bytes", peak_extra_memory(step, device)[1]))
        if result.status == "ok" and device.type == "cuda":
            result.fits_24gb = _fits(step, device, BUDGET_24GB)
    return {
        "model": name,
        "config": MODELS[name],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "lora": LORA,
        "pairs": pairs,
        "seq": seq,
        "scored_tokens": int((labels[:, 1:] != -100).sum()),
        "dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": checkpointing,
        "repeats": repeats,
        "results": [vars(r) | {"time_s": r.time_s} for r, _, _ in runs],
    }


def _guarded(result: E2EResult, optimizer, device: torch.device, action: Callable[[], None]) -> bool:
    """Runs ``action``; an out-of-memory becomes the variant's result (it does not fit), anything else raises."""
    try:
        action()
        return True
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        result.status, result.reason, result.times_s = "oom", first_line(exc), []
        result.fits_24gb = False if device.type == "cuda" else None
        release(device)  # only now: emptying the cache after every step would slow the next
        return False
    finally:
        optimizer.zero_grad(set_to_none=True)
