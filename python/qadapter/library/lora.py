"""Which linear layers of the base the LoRA adapter wraps.

Unset, they are the attention's query and value projections (PEFT's default for most decoders):
``q_proj`` and ``v_proj`` where the model has them, else PEFT's default for the architecture, else
its fused query-key-value projection (Phi-3's ``qkv_proj``, GPT-NeoX's ``query_key_value``, ...).
Named ones are matched as PEFT matches them (a layer's name, or the end of its path:
``self_attn.q_proj``) and checked against the base: a name no layer has would wrap nothing and
train nothing, silently, so it is refused with the names there are.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from qadapter_kernels.config import check_integer, check_real

QUERY_VALUE = ("q_proj", "v_proj")
FUSED_QUERY_KEY_VALUE = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack")


def check_lora_settings(lora_r: object, lora_alpha: object, lora_dropout: object) -> tuple[int, float, float]:
    """The LoRA rank, alpha and dropout as plain Python numbers, or an error naming the one that is
    not: PEFT takes a numpy or torch scalar as it is, and the adapter's config then fails to save as
    JSON after training; an alpha of 0 scales the adapter's output, and its gradient, to nothing."""
    rank = check_integer("lora_r", lora_r, least=1)  # else PEFT's error
    alpha = check_real("lora_alpha", lora_alpha, positive=True)
    dropout = check_real("lora_dropout", lora_dropout, non_negative=True)
    if dropout >= 1:
        raise ValueError(f"lora_dropout must be in [0, 1); got {lora_dropout!r}")
    return rank, int(alpha) if alpha.is_integer() else alpha, dropout


def _linear_layers(base_model: nn.Module) -> tuple[list[str], str | None]:
    """The full names of the base's linear layers an adapter can wrap, and its output head's name
    (the Q head is the adapter's lm_head, trained whole or frozen, never LoRA-wrapped)."""
    head = base_model.get_output_embeddings() if hasattr(base_model, "get_output_embeddings") else None
    names, head_name = [], None
    for name, module in base_model.named_modules():
        if module is head:
            head_name = name
        elif (name and _is_linear(getattr(module, "base_layer", module)) and ".lora_" not in name
              and not name.endswith(".base_layer")):  # a LoRA layer counts once, as itself
            names.append(name)
    return names, head_name


def linear_layer_names(base_model: nn.Module) -> list[str]:
    """The names (last component) of the base's linear layers an adapter can wrap."""
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_layers(base_model)[0]})


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' 4- and 8-bit layers are nn.Linear subclasses; GPT-2's Conv1D is a linear layer too.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def lora_targets(base_model: nn.Module, target_modules: Iterable[str] | None) -> list[str]:
    """The layer names the adapter wraps on ``base_model``: ``target_modules`` checked, or the default."""
    known = linear_layer_names(base_model)
    if target_modules is None:
        return _default_targets(base_model, known)
    full_names, head = _linear_layers(base_model)
    # Read once: a generator checked, then listed, would be no layers.
    names = list(target_modules) if isinstance(target_modules, Iterable) and not isinstance(target_modules, str) else None
    if names is None or not all(isinstance(name, str) for name in names):
        raise TypeError(f"target_modules must be a list of layer names (or None: the attention's query and value "
                        f"projections); got {target_modules!r}")
    if not names:
        raise ValueError("target_modules must name at least one layer (or be None: the attention's query and "
                         "value projections)")
    for name in names:  # PEFT's rule: a layer whose full name is the name or ends with "." + name
        if head is not None and (head == name or head.endswith("." + name)):
            raise ValueError(f"target_modules: {name!r} is the output head, the Q head, which LoRA never wraps "
                             "(train it whole with q_weight, or leave it frozen)")
        if not any(full == name or full.endswith("." + name) for full in full_names):
            raise ValueError(f"target_modules: {name!r} names no linear layer of this model; its linear layers: "
                             f"{', '.join(known)}")
    return names


def lora_config(base_model: nn.Module, targets: list[str], **options):
    """PEFT's causal-LM LoraConfig wrapping ``targets`` of ``base_model``, with ``fan_in_fan_out`` set
    where they are GPT-2's Conv1D layers, which store their weight as ``[in, out]`` (else PEFT warns on
    each layer and sets it itself)."""
    from peft import LoraConfig

    layers = [getattr(module, "base_layer", module) for name, module in base_model.named_modules()
              if any(name == target or name.endswith("." + target) for target in targets)]
    transposed = bool(layers) and all(type(layer).__name__ == "Conv1D" for layer in layers)
    return LoraConfig(task_type="CAUSAL_LM", target_modules=targets, fan_in_fan_out=transposed, **options)


def _default_targets(base_model: nn.Module, known: list[str]) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(getattr(base_model, "config", None), "model_type", None)
    candidates = [QUERY_VALUE, PEFT_DEFAULTS.get(model_type),
                  *([name] for name in FUSED_QUERY_KEY_VALUE)]
    for names in candidates:
        if names and all(name in known for name in names):
            return list(names)
    raise ValueError(f"target_modules: this model ({model_type or type(base_model).__name__}) has no query and "
                     f"value projections by a known name; name the layers to adapt, from its linear layers: "
                     f"{', '.join(known)}")


# init_lora_weights values by which PEFT rewrites the base's weights (W - BA, a quantized residual).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
# PEFT LoRA options that change a LoRA's weights' shapes or scale: a checkpoint resumed must share them.
SCALE_OPTIONS = ("use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "layers_to_transform")


def unsupported_lora_options(config) -> list[str]:
    """The PEFT LoRA options of ``config`` (a ``LoraConfig`` or its saved dict) under which the model
    with its adapter disabled is not the untouched base, or decoding's frozen rows would not be: a
    Q-Adapter's frozen model is the base itself. Each named, with why."""
    def get(key):
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    problems = []
    if get("bias") not in (None, "none"):
        problems.append(f"bias={get('bias')!r} trains the base model's own biases, which disabling the adapter "
                        "does not undo (lora_bias=True trains a bias of the LoRA's own)")
    init = get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        problems.append(f"init_lora_weights={init!r} rewrites the base model's weights (W - BA), so the model "
                        "with its adapter disabled is no longer the base")
    for key in ("modules_to_save", "trainable_token_indices"):
        if get(key):
            problems.append(f"{key}={get(key)!r} trains a copy of whole modules (or token rows) beside the LoRA, "
                            "which decoding's frozen rows would use too")
    return problems

