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
  hidden states), per token and layer: each norm's input in float32 (``4d`` bytes; RMSNorm computes
  in float32; Gemma-2 has four norms a layer, others two); each LoRA-adapted layer's input as a
  float32 copy and its dropout mask (``5 * in`` bytes: PEFT casts the input to the float32 LoRA
  weights); attention's saved tensors: sdpa (with a mask, which every training batch has) keeps q,
  k and v repeated to every head, and its output (``4 * heads * head_dim`` values), eager attention
  (Gemma-2, whose scores are soft-capped) q, k and v and, per score, the float32 softmax and the
  capped scores and probabilities in the model dtype (``heads * max_length`` scores a token: packed
  rows keep no more than padded ones, :func:`qadapter.library.packing.row_capacity`);
  the MLP's gate, up and their activation (``3 * intermediate`` values). The frozen linear layers
  keep nothing for a weight gradient. The first layer's first norm keeps nothing (its input needs no
  gradient) and the final norm as much, so the count holds. With gradient checkpointing, each
  layer's input ``d`` plus one layer's full set recomputed in the backward. Both passes' final
  hidden states;
- **attention mask**: a padding-free batch's tree mask ``[rows, 1, C, C]``, additive in the model
  dtype, one for every pass and layer: at most ``2 N max(2 * max_length, d)`` values at its largest
  (its rows are at most ``C = 2 max(2 * max_length, d)`` long and hold fewer than ``N`` places, or
  packing does not run); a padded batch's is sdpa's boolean one, ``N * max_length`` bytes, which sdpa
  turns into an additive one in every layer, each kept for the backward (``N * max_length`` values a
  layer; one layer's with gradient checkpointing); eager's is a float mask in the model dtype,
  ``N * max_length`` values, added to its scores (its packed rows are about as large at most);
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
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from qadapter_kernels.config import check_integer
from qadapter_kernels.sizing import DEFAULT_CUDA_BUDGET, auto_chunk_size, chunk_row_bytes

from . import quantization as quant
from .defaults import MAX_LENGTH

GIB = 2**30
MIB = 2**20
CUDA_CONTEXT = 512 * MIB
LOSS_BUDGET = DEFAULT_CUDA_BUDGET  # the fused loss's tile budget on CUDA (1 GiB)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BLOCK = 64  # bitsandbytes' 4-bit block size
DOUBLE_QUANT_BLOCK = 256  # blocks per second-level float32 scale


SANDWICH_NORMS = ("gemma2", "gemma3", "gemma3_text")  # a norm before and after attention and the MLP
FUSED_PROJECTIONS = ("phi3",)  # qkv_proj and gate_up_proj


def _attention(config) -> str:
    """The attention implementation a model of ``config`` trains with: the config's own where it names
    one, else sdpa where the architecture has it and eager where it does not (Gemma-2)."""
    chosen = config.get("_attn_implementation") if isinstance(config, dict) else getattr(
        config, "_attn_implementation", None)
    if chosen:
        return chosen
    if isinstance(config, dict):  # no model class to ask: the soft-capped scores eager attention is chosen for
        return "eager" if config.get("attn_logit_softcapping") is not None else "sdpa"
    try:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (ImportError, KeyError):
        return "sdpa"
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


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
    norms: int = 2  # per decoder layer (Gemma-2: 4)
    fused: bool = False  # q, k and v in one qkv_proj and gate and up in one gate_up_proj (Phi-3)
    attention: str = "sdpa"  # the implementation training runs: "sdpa", or "eager" (scores kept)
    attention_softcap: bool = False  # eager scores soft-capped (Gemma-2): one more saved copy

    @classmethod
    def from_config(cls, config) -> ModelShape:
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(vocab=get("vocab_size"), hidden=hidden, intermediate=get("intermediate_size"),
                   layers=get("num_hidden_layers"), heads=heads, kv_heads=get("num_key_value_heads", None) or heads,
                   head_dim=get("head_dim", None) or hidden // heads, tied=bool(get("tie_word_embeddings", False)),
                   norms=4 if get("model_type", None) in SANDWICH_NORMS else 2,
                   fused=get("model_type", None) in FUSED_PROJECTIONS, attention=_attention(config),
                   attention_softcap=get("attn_logit_softcapping", None) is not None)

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of each linear layer of one decoder layer (Llama's names)."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    def adaptable_layers(self) -> dict[str, tuple[int, int]]:
        """The layers a LoRA can wrap, by the architecture's names: Llama's, or Phi-3's fused
        ``qkv_proj`` and ``gate_up_proj`` (the same weights as Llama's layout, which the plan counts)."""
        layers = self.linear_layers()
        if not self.fused:
            return layers
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"qkv_proj": (d, q + 2 * kv), "o_proj": layers["o_proj"], "gate_up_proj": (d, 2 * i),
                "down_proj": layers["down_proj"]}

    def default_targets(self) -> tuple[str, ...]:
        """The layers LoRA wraps unless named, as training chooses them (``qadapter.library.lora``):
        the attention's query and value projections."""
        return ("qkv_proj",) if self.fused else ("q_proj", "v_proj")


@dataclass(frozen=True)
class PlanOptions:
    max_length: int = MAX_LENGTH
    pairs_per_step: int = 8  # training's default (per_device_train_batch_size)
    padding_free: bool = True  # training's default: rows packed (sdpa's mask grows with them)
    gradient_checkpointing: bool = False
    quantization: str | None = None  # None, "4bit" (NF4), "8bit" (LLM.int8)
    double_quant: bool = True
    dtype: str = "bfloat16"
    compute_dtype: str | None = None  # a 4-bit base's compute dtype; None: ``dtype``
    lora_r: int = 8
    target_modules: tuple[str, ...] | None = None  # None: the architecture's query and value projections
    loss_budget: int = LOSS_BUDGET

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # a numpy or torch count, a torch.dtype, a list of layers: as the plain ones
        for name in ("max_length", "pairs_per_step", "lora_r", "loss_budget"):
            set_(self, name, check_integer(name, getattr(self, name)))
        for name in ("padding_free", "gradient_checkpointing", "double_quant"):  # "false" would be true
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}")
        for name in ("dtype", "compute_dtype"):
            if isinstance(getattr(self, name), torch.dtype):
                set_(self, name, str(getattr(self, name)).removeprefix("torch."))
        if self.target_modules is not None:
            targets = self.target_modules
            if isinstance(targets, Iterable) and not isinstance(targets, str):
                targets = tuple(targets)
            if not isinstance(targets, tuple) or not all(isinstance(t, str) for t in targets):
                raise TypeError(f"target_modules must be a list of layer names or None; got {self.target_modules!r}")
            set_(self, "target_modules", targets)
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
    if options is not None and not isinstance(options, PlanOptions):
        raise TypeError(f"options must be a PlanOptions (or its fields as keywords); got {type(options).__name__}")
    options = replace(options or PlanOptions(), **changes)
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    # A 4-bit base loads its dense parts (embeddings, head, norms) in its compute dtype, and runs in it.
    model_dtype = options.compute_dtype if options.quantization == "4bit" and options.compute_dtype else options.dtype
    b, dtype = DTYPE_BYTES[model_dtype], getattr(torch, model_dtype)
    d, layers = shape.hidden, shape.layers
    linears = shape.linear_layers()
    tokens = 2 * options.pairs_per_step * options.max_length

    embeddings = shape.vocab * d * b * (1 if shape.tied else 2)
    norms = (shape.norms * layers + 1) * d * b
    decoder = layers * sum(quantized_linear_bytes(i, o, options.quantization, b, options.double_quant)
                           for i, o in linears.values())
    if options.target_modules is None:
        options = replace(options, target_modules=shape.default_targets())
    adapted = {name: size for name, size in shape.adaptable_layers().items() if name in options.target_modules}
    lora_params = layers * sum(options.lora_r * (i + o) for i, o in adapted.values())
    per_layer = layer_activation_bytes(shape, options, b, adapted)
    if options.gradient_checkpointing:
        kept = tokens * (layers * d * b + per_layer)
    else:
        kept = tokens * layers * per_layer
    transient = 0
    if options.quantization is not None:
        transient = max(i * o for i, o in linears.values()) * b
    # An additive mask in the model dtype (eager's; a packed batch's); transformers' own for sdpa is boolean.
    mask_bytes = b if shape.attention == "eager" or options.padding_free else 1
    mask = tokens * mask_bytes * (2 * max(2 * options.max_length, d) if options.padding_free and shape.attention != "eager"
                                  else options.max_length)
    if shape.attention != "eager" and not options.padding_free:
        # sdpa turns the boolean mask into an additive one in each layer, which the backward keeps (one
        # layer's, recomputed, with gradient checkpointing)
        mask += (1 if options.gradient_checkpointing else layers) * tokens * options.max_length * b
    parts = {
        "base weights": embeddings + norms + decoder,
        "LoRA weights, gradients, AdamW state": 16 * lora_params,
        "activations": kept + 2 * tokens * d * b,
        "attention mask": mask,
        "fused loss buffers": loss_chunk_bytes(tokens, shape.vocab, dtype, options.loss_budget) + 4 * tokens * d,
        "dequantized layer (transient)": transient,
        "CUDA context": CUDA_CONTEXT,
    }
    return MemoryPlan(shape, options, parts)


def layer_activation_bytes(shape: ModelShape, options: PlanOptions, b: int, adapted: dict) -> int:
    """Bytes one decoder layer keeps for the backward, per token (module docstring)."""
    kept = _token_bytes(shape, b, adapted)
    if shape.attention == "eager":
        kept += options.max_length * score_bytes(shape, b)
    return kept


def _token_bytes(shape: ModelShape, b: int, adapted: dict) -> int:
    """What one decoder layer keeps for the backward per token, attention's scores left out."""
    q = shape.heads * shape.head_dim
    kept = shape.norms * 4 * shape.hidden + sum(5 * n_in for n_in, _ in adapted.values()) + 3 * shape.intermediate * b
    return kept + (3 if shape.attention == "eager" else 4) * q * b


def score_bytes(shape: ModelShape, b: int) -> int:
    """What eager attention keeps for the backward per query-key pair, every head's: the float32
    softmax and the probabilities (and the capped scores) in the model dtype."""
    return shape.heads * (4 + b * (2 if shape.attention_softcap else 1))


def scores_per_token(config, dtype: torch.dtype) -> int:
    """How many query-key pairs' kept scores weigh as much as a token's other kept activations, in a
    decoder layer of a model of ``config`` running eager attention in ``dtype`` with LoRA on its
    default layers: the packer's rate of exchange between a row's tokens and its scores
    (:func:`qadapter.library.packing.row_capacity`)."""
    shape = replace(ModelShape.from_config(config), attention="eager")
    b = dtype.itemsize
    adapted = {name: size for name, size in shape.adaptable_layers().items() if name in shape.default_targets()}
    return _token_bytes(shape, b, adapted) // score_bytes(shape, b)


def suggestions(config, options: PlanOptions, gpu_memory: int) -> list[str]:
    """Changes that make a plan fit ``gpu_memory``, as ``qadapter plan`` options with what ``qadapter
    train`` takes for them: single changes first (gradient checkpointing, 4-bit, padded rows where
    packed ones' masks would not fit, fewer pairs per step with gradient accumulation,
    shorter sequences), then the combination of checkpointing and 4-bit with the most pairs that fit."""
    out = []
    if not options.gradient_checkpointing and plan(config, options, gradient_checkpointing=True).fits(gpu_memory):
        out.append("--gradient-checkpointing")
    if options.quantization != "4bit" and plan(config, options, quantization="4bit").fits(gpu_memory):
        out.append(_four_bit(options))
    if options.padding_free and plan(config, options, padding_free=False).fits(gpu_memory):
        out.append("--padded (train: --padding_free false)")
    pairs = options.pairs_per_step // 2
    while pairs >= 1:
        if plan(config, options, pairs_per_step=pairs).fits(gpu_memory):
            out.append(_fewer_pairs(options, pairs))
            break
        pairs //= 2
    length = options.max_length // 2
    while length >= 64:
        if plan(config, options, max_length=length).fits(gpu_memory):
            out.append(f"--max-length {length} (train: --max_length {length})")
            break
        length //= 2
    if not out:
        both = replace(options, gradient_checkpointing=True, quantization="4bit")
        pairs = both.pairs_per_step
        while pairs >= 1 and not plan(config, both, pairs_per_step=pairs).fits(gpu_memory):
            pairs //= 2
        if pairs >= 1:  # only what changes: the options already given are not repeated
            changes = ["--gradient-checkpointing"] * (not options.gradient_checkpointing)
            changes += [_four_bit(options)] * (options.quantization != "4bit")
            if pairs < options.pairs_per_step:
                changes.append(_fewer_pairs(options, pairs))
            out.append(" ".join(changes))
    return out


def _four_bit(options: PlanOptions) -> str:
    return "--load-in-4bit" + (" (instead of --load-in-8bit)" if options.quantization == "8bit" else "")


def _fewer_pairs(options: PlanOptions, pairs: int) -> str:
    accumulate = math.ceil(options.pairs_per_step / pairs)
    return (f"--pairs-per-step {pairs} (train: --per_device_train_batch_size {pairs} "
            f"--gradient_accumulation_steps {accumulate}, the same {pairs * accumulate} pairs an update)")


def parse_size(text: str) -> int:
    """Bytes of ``"12GiB"``, ``"24GB"``, ``"800MiB"``, ``"12G"`` (binary) or a bare number of GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(i?B?)|(B?))\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"a memory size such as 12GiB, 24GB or 800MiB; got {text!r}")
    number, prefix, suffix = float(match.group(1)), (match.group(2) or "").upper(), (match.group(3) or "").lower()
    if not prefix:
        return int(number) if match.group(4) else int(number * GIB)
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
             f"step: {o.pairs_per_step} pairs x 2 rows x {o.max_length} tokens "
             f"({'packed, padding-free' if o.padding_free else 'padded'}), gradient checkpointing "
             f"{'on' if o.gradient_checkpointing else 'off'}; attention {s.attention}"]
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
