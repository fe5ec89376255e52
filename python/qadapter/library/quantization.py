"""A quantized frozen base (QLoRA-style): bitsandbytes NF4 or LLM.int8 through transformers'
``BitsAndBytesConfig``, the LoRA adapter and the lm_head left dense.

The fused loss reads the lm_head's weight as a dense ``[V, d]`` matrix, so the head is never
quantized (``llm_int8_skip_modules=["lm_head"]``, which bitsandbytes' 4-bit path honours too);
``library.hidden.linear_head``, the check of every head the fused loss takes, refuses a quantized one. The LoRA weights stay float32 (PEFT's
default for adapters on a lower-precision base), whatever the compute dtype.

A quantization is written as a small dict, which the saved adapter records
(``qadapter_config.json``, key ``"quantization"``: ``None`` for a dense base)::

    {"method": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}   # 4-bit (QLoRA's choice)
    {"method": "int8"}                                                      # LLM.int8
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

METHODS = ("nf4", "fp4", "int8")
ALIASES = {"4bit": "nf4", "4-bit": "nf4", "nf4": "nf4", "fp4": "fp4", "8bit": "int8", "8-bit": "int8", "int8": "int8"}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
INSTALL_HINT = 'pip install "qadapter-kernels[quant]" (bitsandbytes)'


class QuantizationError(ValueError):
    """A quantization that cannot be honoured: unknown method, unknown keys, a compute dtype it cannot take."""


def default_compute_dtype(torch_dtype=None) -> str:
    """The 4-bit compute dtype when none is named: the model's dtype if given, else (None, or "auto":
    the checkpoint's, as the command line's --dtype auto) bfloat16 on CUDA (QLoRA's choice) and
    float32 elsewhere (bitsandbytes' CPU kernels)."""
    if torch_dtype is not None and torch_dtype != "auto":
        return str(torch_dtype).removeprefix("torch.")
    return "bfloat16" if torch.cuda.is_available() else "float32"


def normalize(quantization: Any, torch_dtype=None) -> dict | None:
    """The canonical dict of a quantization given as ``None``, ``"4bit"``/``"nf4"``/``"fp4"``,
    ``"8bit"``/``"int8"``, a dict (``method`` plus optional ``double_quant``, ``compute_dtype``) or a
    ``transformers.BitsAndBytesConfig``."""
    if quantization is None or quantization is False:
        return None
    if isinstance(quantization, str):
        quantization = {"method": quantization}
    elif hasattr(quantization, "load_in_4bit"):  # a BitsAndBytesConfig
        _check_recordable(quantization)
        quantization = from_bnb_config(quantization)
        if quantization is None:
            return None
    elif not isinstance(quantization, dict):
        raise QuantizationError(f"quantization must be None, '4bit', '8bit' (or nf4, fp4, int8), a dict or a "
                                f"transformers.BitsAndBytesConfig; got {quantization!r}")
    unknown = set(quantization) - {"method", "double_quant", "compute_dtype"}
    if unknown:
        raise QuantizationError(f"unknown quantization keys {sorted(unknown)} (method, double_quant, compute_dtype)")
    method = ALIASES.get(str(quantization.get("method", "")).lower())
    if method is None:
        raise QuantizationError(f"quantization method must be one of {sorted(ALIASES)}; got {quantization.get('method')!r}")
    double_quant = quantization.get("double_quant", True)
    if not isinstance(double_quant, bool):
        raise QuantizationError(f"double_quant must be True or False; got {double_quant!r}")
    if method == "int8":
        if quantization.get("compute_dtype") is not None or "double_quant" in quantization:
            raise QuantizationError("compute_dtype and double_quant apply to a 4-bit base; LLM.int8 (int8) takes neither")
        return {"method": "int8"}
    compute = quantization.get("compute_dtype") or default_compute_dtype(torch_dtype)
    compute = str(compute).removeprefix("torch.")
    if compute not in COMPUTE_DTYPES:
        raise QuantizationError(f"compute_dtype must be one of {COMPUTE_DTYPES}; got {compute!r}")
    return {"method": method, "double_quant": double_quant, "compute_dtype": compute}


# BitsAndBytesConfig settings beyond method, double quantization and compute dtype, with the values
# that mean what the base is loaded with (the first: the one it is loaded with): the adapter's record
# holds no others, so a config that changes one is refused rather than loaded as if it did not (the
# lm_head is kept dense in any case).
RECORDED_ONLY = {"llm_int8_skip_modules": (["lm_head"], None), "llm_int8_enable_fp32_cpu_offload": (False,)}
RECORDED_ONLY_8BIT = {"llm_int8_threshold": (6.0,), "llm_int8_has_fp16_weight": (False,)}
RECORDED_ONLY_4BIT = {"bnb_4bit_quant_storage": ("uint8", None, torch.uint8)}


def _check_recordable(config: Any) -> None:
    settings = {**RECORDED_ONLY, **(RECORDED_ONLY_4BIT if getattr(config, "load_in_4bit", False) else RECORDED_ONLY_8BIT)}
    for name, allowed in settings.items():
        value = getattr(config, name, None)
        if value not in allowed:
            raise QuantizationError(f"BitsAndBytesConfig.{name}={value!r} is not supported: a base is loaded with "
                                    f"{name}={allowed[0]!r} (an adapter records the method, double quantization "
                                    "and compute dtype only)")


def from_bnb_config(config: Any) -> dict | None:
    """The dict of a ``BitsAndBytesConfig`` (or its ``to_dict()``), None when it quantizes nothing."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if get("load_in_4bit", False):
        compute = get("bnb_4bit_compute_dtype", None)
        return {"method": str(get("bnb_4bit_quant_type", "nf4")), "double_quant": bool(get("bnb_4bit_use_double_quant", False)),
                "compute_dtype": str(compute).removeprefix("torch.") if compute is not None else "float32"}
    if get("load_in_8bit", False):
        return {"method": "int8"}
    return None


def bnb_config(quantization: dict):
    """transformers' ``BitsAndBytesConfig`` for a normalized quantization, the lm_head kept dense."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantization["method"] == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization["method"],
                              bnb_4bit_use_double_quant=quantization["double_quant"],
                              bnb_4bit_compute_dtype=getattr(torch, quantization["compute_dtype"]),
                              llm_int8_skip_modules=["lm_head"])


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModuleNotFoundError(f"a quantized base needs bitsandbytes: {INSTALL_HINT}") from exc


def model_quantization(model: nn.Module) -> dict | None:
    """How a loaded transformers model (or a PEFT model around one) was quantized, or None."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None or not (getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None)):
        return None
    return normalize(from_bnb_config(config))


def describe(quantization: dict | None) -> str:
    if quantization is None:
        return "dense (not quantized)"
    if quantization["method"] == "int8":
        return "LLM.int8 (8-bit)"
    double = ", double quantization" if quantization["double_quant"] else ""
    return f"{quantization['method'].upper()} 4-bit{double}, compute {quantization['compute_dtype']}"


def keep_training_layout(model: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit CPU layer's weight in place, for inference, the first time it
    runs in eval mode on an input without grad (the frozen pass), and that layout's kernel then fails
    under autograd on a layer with a bias (Qwen2's q/k/v); it would also change the stored tensors
    the fingerprint reads. The layout stays the one loaded, and a layer repacked already (the base
    run for inference before it was given here) gets it back (:func:`loaded_layout`)."""
    loaded_layout(model)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def loaded_layout(model: nn.Module) -> None:
    """Puts every 4-bit CPU layer of ``model`` that an inference forward repacked back in the layout
    it was loaded in, as bitsandbytes' own ``state_dict`` does before saving it: the fingerprint of a
    base read repacked would be another than that of the same base loaded afresh, and an adapter
    trained or checked on it refused on every other load of that base."""
    for module in model.modules():
        weight = getattr(module, "weight", None) if hasattr(module, "support_avx512bf16_for_cpu") else None
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """What ``peft.prepare_model_for_kbit_training`` does for a frozen quantized base, without its
    cast of every non-quantized weight (embeddings, lm_head, norms) to float32, which on a large
    vocabulary costs more memory than the quantized layers save: every base weight frozen and the
    loaded layout kept (:func:`keep_training_layout`). Gradient checkpointing is the trainer's
    (``QAdapterModel.gradient_checkpointing_enable``, non-reentrant: no input needs to require grad)."""
    for param in model.parameters():
        param.requires_grad_(False)
    keep_training_layout(model)
    return model


def load_kwargs(quantization: dict | None, device=None) -> dict:
    """Keyword arguments of ``from_pretrained`` loading a base with ``quantization`` (bitsandbytes
    places the weights as it loads them: a device map, no later ``.to``)."""
    if quantization is None:
        return {}
    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": bnb_config(quantization), "device_map": {"": str(device)}}
