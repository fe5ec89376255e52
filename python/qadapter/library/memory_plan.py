"""A memory plan: the predicted peak GPU memory of Q-Adapter training, from a model's config alone.

The peak is the sum of (bytes; ``N = 2 * pairs_per_step * max_length`` tokens, chosen and rejected
rows padded to ``max_length``; ``b`` the bytes of the model dtype):

- **base weights**: embeddings and the lm_head (never quantized; none when the head is tied) and
  the norms in the model dtype; every decoder linear layer in the model dtype, or 4-bit NF4 (half
  a byte per weight plus its block scales: one int8 per 64 weights and one float32 per 256 blocks
  with double quantization, else one float32 per 64), or LLM.int8 (a byte per weight and a
  float32 scale per output row);
- **LoRA and AdamW**: ``r * (in + out)`` parameters per adapted layer, float32 weights, float32
  gradients and AdamW's two float32 moments: 16 bytes a parameter;
- **activations** kept for the backward of the adapter pass (the frozen pass keeps only its final
  hidden states): per token and layer, ``3d + 2*(heads + kv_heads)*head_dim + 3*intermediate``
  values (the two norms' inputs, the normalized input of the LoRA layers, attention's q, k, v and
  output, the MLP's gate, up and their activation; the frozen linear layers keep nothing for a
  weight gradient); with gradient checkpointing, each layer's input ``d`` plus one layer's full
  set recomputed in the backward; and both passes' final hidden states ``2 * N * d``;
- **attention mask**: sdpa's boolean ``[rows, 1, C, C]`` mask, one for every pass and layer: at
  most ``2 N max(2 * max_length, d)`` bytes, a padding-free batch's tree mask at its largest (its
  rows are at most ``C = 2 max(2 * max_length, d)`` long and hold fewer than ``N`` places, or
  packing does not run); a padded batch's is ``N * max_length``;
- **the fused loss**: its ``[chunk, V]`` tiles (``qadapter_kernels.sizing.auto_chunk_size``: at
  most its budget, 1 GiB on CUDA) and the float32 ``E_p[Wq]`` rows, ``4 * N * d``;
- **transient**: the largest 4-bit or 8-bit layer dequantized while it runs (4-bit: to its compute
  dtype, by default the model dtype; LLM.int8: the model dtype);
- **CUDA context**: a fixed 512 MiB outside the allocator (the context, cuBLAS workspaces).

It is a prediction from the configuration (every sequence padded to ``max_length``, every token
scored, no allocator fragmentation), meant to say whether a run fits and what would make it fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch

from qadapter_kernels.sizing import DEFAULT_CUDA_BUDGET, auto_chunk_size, chunk_row_bytes

from . import quantization as quant

GIB = 2**30
MIB = 2**20
CUDA_CONTEXT = 512 * MIB
LOSS_BUDGET = DEFAULT_CUDA_BUDGET  # the fused loss's tile budget on CUDA (1 GiB)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BLOCK = 64  # bitsandbytes' 4-bit block size
DOUBLE_QUANT_BLOCK = 256  # blocks per second-level float32 scale


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that the plan needs."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> ModelShape:
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(vocab=get("vocab_size"), hidden=hidden, intermediate=get("intermediate_size"),
                   layers=get("num_hidden_layers"), heads=heads, kv_heads=get("num_key_value_heads", None) or heads,
                   head_dim=get("head_dim", None) or hidden // heads, tied=bool(get("tie_word_embeddings", False)))

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of each linear layer of one decoder layer (Llama's names)."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    def adaptable_layers(self) -> dict[str, tuple[int, int]]:
        """The layers a LoRA can wrap: Llama's, and the fused ones other architectures have instead
        (Phi-3's ``qkv_proj`` and ``gate_up_proj``: the same weights, so not in :meth:`linear_layers`)."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {**self.linear_layers(), "qkv_proj": (d, q + 2 * kv), "gate_up_proj": (d, 2 * i)}


@dataclass(frozen=True)
class PlanOptions:
    max_length: int = 512
    pairs_per_step: int = 4
    gradient_checkpointing: bool = False
    quantization: str | None = None  # None, "4bit" (NF4), "8bit" (LLM.int8)
    double_quant: bool = True
    dtype: str = "bfloat16"
    compute_dtype: str | None = None  # a 4-bit base's compute dtype; None: ``dtype``
    lora_r: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    loss_budget: int = LOSS_BUDGET

    def __post_init__(self) -> None:
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be None, '4bit' or '8bit'; got {self.quantization!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}; got {self.dtype!r}")
        if self.compute_dtype not in (None, *DTYPE_BYTES):
            raise ValueError(f"compute_dtype must be None or one of {sorted(DTYPE_BYTES)}; got {self.compute_dtype!r}")
        if min(self.max_length, self.pairs_per_step, self.lora_r) < 1:
            raise ValueError("max_length, pairs_per_step and lora_r must be positive")

    @classmethod
    def of(cls, quantization, **options) -> PlanOptions:
        """The plan's options for a base quantized as ``quantization`` says (anything
        :func:`qadapter.library.quantization.normalize` takes: ``"4bit"``, a dict, ...), which
        loading takes too: method, double quantization and the 4-bit compute dtype."""
        q = quant.normalize(quantization, options.get("dtype", cls.dtype))
        if q is None:
            return cls(**options)
        if q["method"] == "int8":
            return cls(quantization="8bit", **options)
        return cls(quantization="4bit", double_quant=q["double_quant"], compute_dtype=q["compute_dtype"], **options)


@dataclass
class MemoryPlan:
    shape: ModelShape
    options: PlanOptions
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def fits(self, gpu_memory: int) -> bool:
        return self.peak <= gpu_memory


def quantized_linear_bytes(n_in: int, n_out: int, quantization: str | None, dtype_bytes: int,
                           double_quant: bool = True) -> int:
    """Bytes of one linear layer's weight as stored."""
    n = n_in * n_out
    if quantization is None:
        return n * dtype_bytes
    if quantization == "8bit":
        return n + 4 * n_out
    blocks = math.ceil(n / BLOCK)
    scales = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) if double_quant else 4 * blocks
    return math.ceil(n / 2) + scales


def loss_chunk_bytes(tokens: int, vocab: int, dtype: torch.dtype, budget: int = LOSS_BUDGET) -> int:
    """The fused loss's ``[chunk, V]`` tiles as the kernels size them on CUDA (``auto_chunk_size`` for
    the fused row steps: ``z``, ``q`` in the input dtype and one float32 ``P``)."""
    chunk = auto_chunk_size(tokens, vocab, dtype, torch.device("cuda"), budget, widened=False)
    return chunk * chunk_row_bytes(vocab, dtype, widened=False)


def plan(config, options: PlanOptions | None = None, **changes) -> MemoryPlan:
    """The predicted peak of a training step (module docstring) for a model config (a transformers
    config, a dict, or a :class:`ModelShape`)."""
    options = replace(options or PlanOptions(), **changes)
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    b = DTYPE_BYTES[options.dtype]
    d, layers = shape.hidden, shape.layers
    linears = shape.linear_layers()
    tokens = 2 * options.pairs_per_step * options.max_length

    embeddings = shape.vocab * d * b * (1 if shape.tied else 2)
    norms = (2 * layers + 1) * d * b
    decoder = layers * sum(quantized_linear_bytes(i, o, options.quantization, b, options.double_quant)
                           for i, o in linears.values())
    lora_params = layers * sum(options.lora_r * (i + o) for name, (i, o) in shape.adaptable_layers().items()
                               if name in options.target_modules)
    per_layer = 3 * d + 2 * (shape.heads + shape.kv_heads) * shape.head_dim + 3 * shape.intermediate
    if options.gradient_checkpointing:
        kept = tokens * (layers * d + per_layer) * b
    else:
        kept = tokens * layers * per_layer * b
    transient = 0
    if options.quantization is not None:
        compute = options.compute_dtype if options.quantization == "4bit" and options.compute_dtype else options.dtype
        transient = max(i * o for i, o in linears.values()) * DTYPE_BYTES[compute]
    parts = {
        "base weights": embeddings + norms + decoder,
        "LoRA weights, gradients, AdamW state": 16 * lora_params,
        "activations": kept + 2 * tokens * d * b,
        "attention mask": tokens * 2 * max(2 * options.max_length, d),
        "fused loss buffers": loss_chunk_bytes(tokens, shape.vocab, getattr(torch, options.dtype), options.loss_budget) + 4 * tokens * d,
        "dequantized layer (transient)": transient,
        "CUDA context": CUDA_CONTEXT,
    }
    return MemoryPlan(shape, options, parts)


def suggestions(config, options: PlanOptions, gpu_memory: int) -> list[str]:
    """Changes that make a plan fit ``gpu_memory``: single changes first (gradient checkpointing,
    4-bit, fewer pairs per step with gradient accumulation, shorter sequences), then the
    combination of checkpointing and 4-bit with the most pairs that fit."""
    out = []
    if not options.gradient_checkpointing and plan(config, options, gradient_checkpointing=True).fits(gpu_memory):
        out.append("--gradient-checkpointing")
    if options.quantization != "4bit" and plan(config, options, quantization="4bit").fits(gpu_memory):
        out.append("--load-in-4bit")
    pairs = options.pairs_per_step // 2
    while pairs >= 1:
        if plan(config, options, pairs_per_step=pairs).fits(gpu_memory):
            accumulate = math.ceil(options.pairs_per_step / pairs)
            out.append(f"--pairs-per-step {pairs} (with --gradient_accumulation_steps {accumulate} in training)")
            break
        pairs //= 2
    length = options.max_length // 2
    while length >= 64:
        if plan(config, options, max_length=length).fits(gpu_memory):
            out.append(f"--max-length {length}")
            break
        length //= 2
    if not out:
        both = replace(options, gradient_checkpointing=True, quantization="4bit")
        pairs = both.pairs_per_step
        while pairs >= 1 and not plan(config, both, pairs_per_step=pairs).fits(gpu_memory):
            pairs //= 2
        if pairs >= 1:  # only what changes: the options already given are not repeated
            changes = ["--gradient-checkpointing"] * (not options.gradient_checkpointing)
            changes += ["--load-in-4bit"] * (options.quantization != "4bit")
            if pairs < options.pairs_per_step:
                accumulate = math.ceil(options.pairs_per_step / pairs)
                changes.append(f"--pairs-per-step {pairs} (with --gradient_accumulation_steps {accumulate} in training)")
            out.append(" ".join(changes))
    return out


def parse_size(text: str) -> int:
    """Bytes of ``"12GiB"``, ``"24GB"``, ``"800MiB"``, ``"12G"`` (binary) or a bare number of GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"a memory size such as 12GiB, 24GB or 800MiB; got {text!r}")
    number, prefix, suffix = float(match.group(1)), match.group(2).upper(), match.group(3).lower()
    if not prefix:
        return int(number * GIB) if not suffix else int(number)
    power = "KMGT".index(prefix) + 1
    base = 1000 if suffix == "b" else 1024  # "GB" decimal; "GiB" and "G" binary
    return int(number * base**power)


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / MIB:.1f} MiB"


def format_plan(memory_plan: MemoryPlan, gpu_memory: int | None = None, advice: list[str] | None = None) -> str:
    o, s = memory_plan.options, memory_plan.shape
    quant = {None: o.dtype, "4bit": f"NF4 4-bit{' (double quantization)' if o.double_quant else ''}, "
                                    f"compute {o.compute_dtype or o.dtype}",
             "8bit": "LLM.int8"}[o.quantization]
    lines = [f"model: {s.layers} layers, hidden {s.hidden}, vocabulary {s.vocab}; base {quant}, LoRA r={o.lora_r} "
             f"on {', '.join(o.target_modules)}",
             f"step: {o.pairs_per_step} pairs x 2 rows x {o.max_length} tokens, gradient checkpointing "
             f"{'on' if o.gradient_checkpointing else 'off'}"]
    width = max(map(len, memory_plan.parts))
    lines += [f"  {name:<{width}}  {format_bytes(size):>11}" for name, size in memory_plan.parts.items()]
    lines.append(f"  {'predicted peak':<{width}}  {format_bytes(memory_plan.peak):>11}")
    if gpu_memory is not None:
        if memory_plan.fits(gpu_memory):
            lines.append(f"fits in {format_bytes(gpu_memory)} ({format_bytes(gpu_memory - memory_plan.peak)} to spare)")
        else:
            lines.append(f"does not fit in {format_bytes(gpu_memory)} (short by "
                         f"{format_bytes(memory_plan.peak - gpu_memory)})")
            lines += ([f"  would fit with: {a}" for a in advice] if advice
                      else ["  no change tried here makes it fit: a smaller model or a larger GPU"])
    return "\n".join(lines)
