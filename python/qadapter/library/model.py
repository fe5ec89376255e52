"""QAdapterModel: a frozen Hugging Face causal LM plus a PEFT LoRA adapter as the residual Q-function.

Training: the frozen model's final hidden states (adapter disabled, no grad) and the adapter's
(with grad) go to :func:`qadapter_kernels.qadapter_loss` with the shared lm_head weight
(:func:`qadapter.library.hidden.frozen_and_adapter_hidden`), so the full ``[B, T, V]`` logits never exist.

Generation decodes the customized policy ``log_softmax((Q + alpha_0 * log pi1) / alpha~)`` with
transformers' own ``generate`` (:class:`qadapter.library.policy.CombinedPolicy`): one KV-cached forward
per step over the batch doubled into frozen rows and adapter rows, so a token costs about one
forward of the model.

The loss options, their defaults and their checks are :class:`qadapter_kernels.LossConfig`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from qadapter_kernels import LossConfig, combine_logits, qadapter_loss, registry

from . import atomic, provenance
from . import quantization as quant
from .data import check_template_options
from .defaults import DEFAULT_MODEL, load_base, names_missing_folder
from .hidden import (
    LevelPasses,
    activate_adapters,
    checked_packing,
    evaluation_mode,
    full_weight,
    head_softcap,
    level_hidden,
    linear_head,
    whole_parameters,
)
from .lent import BaseInUse, lend
from .lora import SCALE_OPTIONS, check_lora_settings, lora_config, lora_targets, unsupported_lora_options
from .one_at_a_time import one_call_at_a_time
from .policy import ADAPTER_NAME, CombinedPolicy, RowPlan
from .saved import (
    CONFIG_NAME,
    FORMAT_VERSION,
    LEVEL_FILES,
    STACKED_FORMAT_VERSION,
    TEMPLATE_FORMAT_VERSION,
    WEIGHTS_NAME,
    AdapterLoadError,
    Level,
    adapter_digest,
    check_q_on,
    check_saved_lora,
    holds_adapter,
    hub_pin,
    locate_adapter,
    model_card,
    read_adapter_config,
    run_options,
)
from .stack import (
    StackedRows,
    effective_hidden,
    freeze_level,
    level_name,
    q_networks,
)

# The combination that makes a distribution of plain logits (alpha_0 = 0, alpha~ = 1): a stack's
# policy is a softmax of h_eff_L W, measured against the base by this.
PLAIN_LOSS = LossConfig(alpha_0=0.0, alpha_tilde=1.0)

class QAdapterModelOutput(NamedTuple):
    """What QAdapterModel's forward returns: the fields of :class:`QAdapterLossOutput`, in its order,
    then the tokens each of its passes ran (the packed batch's under padding_free, else B * T), which
    the trainer logs beside the padded batch's."""

    loss: torch.Tensor
    bt_loss: torch.Tensor
    chi2_loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor
    pass_tokens: int


def base_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the base weights: names, shapes and a strided sample of each tensor's values.

    Values are rounded to bfloat16 first, so the same base loaded in fp32 or bf16 agrees; loaded in
    fp16 it may not (float16 rounds fp32 weights otherwise than bfloat16, and its subnormals drop a
    small weight's bits), which a refusal's message says. A
    quantized base (bitsandbytes) is fingerprinted by its stored tensors (NF4 codes packed in uint8,
    int8 rows), exact in bfloat16, so it is deterministic for a given base and method and differs
    from the dense base's (a 4-bit CPU layer that an inference forward repacked is put back in its
    loaded layout first: :func:`~.quantization.loaded_layout`); the method itself is recorded beside it (``"quantization"``). A
    PEFT model gives its base's fingerprint (LoRA weights left out, ``base_layer`` names folded
    back), so an adapter can be checked against a base whether or not it is already attached. A base
    DeepSpeed ZeRO-3 holds partitioned (loaded under its ``zero.Init``) is read one parameter at a
    time, gathered on every process, so it gives the dense base's fingerprint.
    """
    if hasattr(model, "get_base_model"):  # a peft.PeftModel
        model = model.get_base_model()
    quant.loaded_layout(model)  # a 4-bit CPU base run for inference first: read as it was loaded
    params = {name.replace(".base_layer.", "."): param for name, param in model.named_parameters() if "lora_" not in name}
    digest = hashlib.sha256()
    for name, param in sorted(params.items(), key=lambda item: item[0]):
        with whole_parameters([param]):
            flat = param.detach().as_subclass(torch.Tensor).reshape(-1)  # bitsandbytes' parameter classes as plain tensors
            sample = flat[:: max(1, flat.numel() // 256)][:256].to("cpu", torch.bfloat16)
            digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


class QAdapterModel(nn.Module):
    """A frozen causal LM with a LoRA residual Q-function; ``forward`` returns the Q-Adapter loss.

    ``QAdapterModel(base, ...)`` attaches a fresh adapter; :meth:`from_peft_model` wraps a PEFT model
    that carries one already. PEFT injects the LoRA layers into ``base`` in place: the base is this
    model's alone while it lives (another on it is refused), and once its PEFT model is gone the
    base is given back as it was (:mod:`qadapter.library.lent`). The loss options are ``loss`` (a :class:`LossConfig`, default: its
    defaults) with single fields replaced by ``**loss_options``; an unknown name is a TypeError.
    ``target_modules``: the linear layers LoRA wraps (:func:`qadapter.library.lora.lora_targets`; None:
    the attention's query and value projections, by whatever name the architecture gives them).

    ``chat_template_kwargs``: the chat template's options the adapter is trained with (Qwen3's
    ``enable_thinking``, ...), saved with it: its prompts are rendered with them wherever it answers
    (evaluation, generation, the server's chats, lm-eval). None: none, or on a stack its parent's.

    ``on``: a saved adapter (its directory or a hub repository): the new adapter is trained on top of
    that customized policy (a stack, :mod:`qadapter.library.stack`; its own levels come along), its Q
    network the parent's plus the new LoRA (``q_on="parent"``) or the base plus the new LoRA
    (``q_on="base"``). The levels :func:`levels_on` found for it are taken too: a caller that checked
    them first neither hashes the parent again nor asks the hub for it again.
    """

    # The passes over a padded batch run packed (qadapter.library.packing): a run setting, not saved.
    padding_free = True

    def __init__(
        self,
        base_model: nn.Module,
        *,
        tokenizer: Any = None,
        loss: LossConfig | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.05,
        target_modules: Iterable[str] | None = None,
        on: str | os.PathLike | Sequence[Level] | None = None,
        q_on: str = "parent",
        padding_free: bool = True,
        chat_template_kwargs: dict | None = None,
        **loss_options,
    ) -> None:
        from peft import get_peft_model

        super().__init__()
        self._configure(tokenizer, loss, backend, chunk_size, loss_options)  # refuse bad options before any work
        template_options = check_template_options(chat_template_kwargs)
        check_q_on(q_on)
        if not isinstance(padding_free, bool):
            raise TypeError(f"padding_free must be True or False; got {padding_free!r}")
        lora_r, lora_alpha, lora_dropout = check_lora_settings(lora_r, lora_alpha, lora_dropout)
        self.padding_free = padding_free
        levels = None if on is None else list(on) if _are_levels(on) else levels_on(on)
        targets = lora_targets(base_model, target_modules)
        self._take_softcap(base_model)
        self.quantization = quant.model_quantization(base_model)
        lora = lora_config(base_model, targets, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)

        def wrap() -> nn.Module:
            if self.quantization is not None:
                quant.prepare_for_kbit_training(base_model)
            return get_peft_model(base_model, lora, adapter_name=ADAPTER_NAME)

        # The caller's base gets its own layers back once the PEFT model is gone (lent.py).
        self.peft_model = lend(base_model, wrap)
        self.fingerprint = base_fingerprint(self.peft_model)
        if levels is not None:
            self._stack_levels(levels, q_on, "on")
        if chat_template_kwargs is None and self.stack:  # trained on another: its chats rendered as that one's
            template_options = read_adapter_config(self.stack[-1].location())["chat_template_kwargs"]
        self.chat_template_kwargs = template_options

    def _configure(self, tokenizer, loss, backend, chunk_size, loss_options) -> None:
        self.loss, self.backend, self.chunk_size = run_options(loss, backend, chunk_size, **loss_options)
        self.tokenizer = tokenizer
        # What training adds to the saved provenance (provenance.build): data, training, metrics.
        self.provenance: dict = {}
        # The saved adapters under this one, the first on the base (a stack); empty for one adapter.
        self.stack: tuple[Level, ...] = ()
        self.q_on: str | None = None
        self.chat_template_kwargs: dict = {}

    def _stack_levels(self, levels: list[Level], q_on: str, argument: str) -> None:
        """Loads ``levels`` as frozen PEFT adapters under this one, each checked: same base, same
        quantization, files unchanged since recorded (``argument`` names where they came from)."""
        check_stackable(self.loss.logit_softcap, argument)
        found = []
        for k, level in enumerate(levels, 1):
            path = find_level(level, k, argument, self.fingerprint, self.quantization)
            load_lora(self.peft_model, path, level_name(k), f"{argument}: stack level {k}", frozen=True)
            found.append(level.found_at(path))
        self.stack, self.q_on = tuple(found), q_on
        # The adapters this model's Q network runs are its active ones, whatever runs its forward.
        activate_adapters(self.peft_model, self.q_networks[-1])
        self.provenance["parent_adapter"] = {**found[-1].as_dict(), "depth": len(found)}

    def _take_softcap(self, base_model: nn.Module) -> None:
        """The loss takes the model's logit soft-capping (Gemma-2), unless it names another cap."""
        if self.loss.logit_softcap is None:
            self.loss = LossConfig.from_options(self.loss, logit_softcap=head_softcap(base_model))
        linear_head(base_model, self.loss.logit_softcap)

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_peft_model(cls, peft_model: nn.Module, *, tokenizer: Any = None, loss: LossConfig | None = None,
                        backend: str = "auto", chunk_size: int | None = None, **loss_options) -> QAdapterModel:
        """Wraps a ``peft.PeftModel`` whose LoRA adapter ``"default"`` is the Q-function (loaded from
        files, or built elsewhere); its LoRA settings are its own."""
        config = getattr(peft_model, "peft_config", {}).get(ADAPTER_NAME)
        if getattr(config, "peft_type", None) != "LORA":  # PeftType is a str enum
            raise ValueError(f"a Q-Adapter wraps a PEFT model with a LoRA adapter named {ADAPTER_NAME!r}; "
                             f"got {type(peft_model).__name__}")
        problems = unsupported_lora_options(config)
        if problems:
            raise ValueError(f"the PEFT model's LoRA config: {'; '.join(problems)}; a Q-Adapter trains LoRA "
                             "matrices beside an untouched frozen base")
        if getattr(config, "use_dora", False):  # said now, not after a training run
            warnings.warn("use_dora=True: training and evaluation take DoRA, but decoding (generate, AdapterSet, "
                          "the server) runs plain LoRA only and refuses this adapter", stacklevel=2)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._configure(tokenizer, loss, backend, chunk_size, loss_options)
        model._take_softcap(peft_model.get_base_model())
        model.quantization = quant.model_quantization(peft_model)
        if model.quantization is not None:
            quant.keep_training_layout(peft_model)
        model.peft_model = peft_model
        model.fingerprint = base_fingerprint(peft_model)
        return model

    @classmethod
    def from_base(cls, model: str | os.PathLike | nn.Module | None = None, *, torch_dtype=None, device=None,
                  quantization=None,
                  **options) -> QAdapterModel:
        """A fresh adapter (LoRA B = 0, so Q = base logits) on a model object, a path, a hub name or (None)
        the default; with ``on`` (a saved adapter to stack on), None is the base that adapter names.

        ``quantization`` loads a named base quantized by bitsandbytes (QLoRA-style): ``"4bit"`` (NF4,
        double quantization, compute dtype ``torch_dtype`` or bfloat16 on CUDA, float32 on a CPU),
        ``"8bit"`` (LLM.int8), a dict ``{"method", "double_quant", "compute_dtype"}`` or a
        ``transformers.BitsAndBytesConfig``; the lm_head and the LoRA weights stay dense. A model
        object is taken as it is (quantized or not)."""
        tokenizer = options.pop("tokenizer", None)
        if isinstance(model, os.PathLike):  # a folder given as a Path is a folder given by name
            model = os.fspath(model)
        if model is None:
            on = options.get("on")
            if on is not None:
                parent = Path(on[-1].path) if _are_levels(on) else locate_adapter(on)
                model = read_adapter_config(parent)["base_model"]
            model = model or DEFAULT_MODEL
        if isinstance(model, str):
            model, tokenizer = load_base(model, torch_dtype=torch_dtype, device=device, quantization=quantization)
        elif quantization is not None:
            raise ValueError("quantization= applies to a base loaded by name; quantize a model object when loading it")
        return cls(model, tokenizer=tokenizer, **options)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base_model: str | os.PathLike | nn.Module | None = None, *,
                        torch_dtype=None, device=None, is_trainable: bool = False,
                        quantization: Any = "saved", revision: str | None = None) -> QAdapterModel:
        """Loads a saved adapter (a folder, or a hub repository ``owner/name[@revision]``, or with
        ``revision=``: :func:`~qadapter.library.saved.locate_adapter`) onto its base model (by
        default the one named in its config).

        The base is loaded quantized as it was in training (``quantization="saved"``, the adapter's
        recorded ``"quantization"``; for a 4-bit base, ``torch_dtype`` is its compute dtype); another
        quantization (``None``: dense), or a base model object quantized otherwise, is refused: the
        adapter learned a residual on that base's outputs."""
        from peft import PeftModel

        path = locate_adapter(path, revision)
        atomic.recover(path, reading=True)  # finishes a save that a crash interrupted
        config = read_adapter_config(path)
        check_saved_lora(path, config)
        base_model, tokenizer = load_saved_base(path, config, base_model, torch_dtype=torch_dtype, device=device,
                                                quantization=quantization)
        with warnings_held_while_checked(), generators_kept(base_model):
            try:
                peft_model = lend(base_model, lambda: PeftModel.from_pretrained(
                    base_model, path, adapter_name=ADAPTER_NAME, is_trainable=is_trainable))
            except BaseInUse:
                raise
            except Exception as exc:  # safetensors and PEFT raise several types for unreadable files
                raise AdapterLoadError(f"the adapter weights in {path} cannot be loaded (corrupted or incomplete?): "
                                       f"{exc}") from exc
            check_adapter_weights(peft_model, path)
        model = cls.from_peft_model(peft_model, tokenizer=tokenizer, **config["loss"])
        model.chat_template_kwargs = config["chat_template_kwargs"]
        if config["stack"]:
            model._stack_levels([Level.from_dict(r, str(path), path) for r in config["stack"]], config["q_on"], str(path))
        if device is not None and config["quantization"] is None:  # a quantized base is placed as it loads
            peft_model.to(device)
        return model

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        """Replaces the adapter's weights with those saved in ``path`` (a trainer checkpoint or a saved
        adapter: resume, best-model loading), checked as :meth:`from_pretrained` checks them: an
        interrupted save is finished first, the base fingerprint must be this model's, its LoRA rank,
        alpha and layers this adapter's, and the saved tensors exactly this adapter's (PEFT would load
        a partial set with a warning)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        atomic.recover(path, reading=True)
        config = read_adapter_config(path)
        check_base(path, config, self.fingerprint, self.quantization)
        ours = self.adapter_config()["lora"]
        differs = {key: (value, ours[key]) for key, value in (config.get("lora") or {}).items()
                   if key in ("r", "lora_alpha", "target_modules") and key in ours and value != ours[key]}
        differs.update(_peft_options_differing(path, self.peft_model.peft_config[ADAPTER_NAME]))
        if differs:  # the weights' shapes or scale differ: one line, not a size mismatch per tensor
            raise AdapterLoadError(f"{path} holds a LoRA of {', '.join(f'{k} {v!r}' for k, (v, _) in differs.items())}"
                                   f"; this model's has {', '.join(f'{k} {o!r}' for k, (_, o) in differs.items())} "
                                   "(train and resume with the same LoRA settings)")
        check_adapter_weights(self.peft_model, path)
        file = path / WEIGHTS_NAME
        try:
            state = load_file(file)
            result = set_peft_model_state_dict(self.peft_model, state, adapter_name=ADAPTER_NAME)
        except Exception as exc:  # unreadable file; a tensor of another shape (another LoRA rank)
            raise AdapterLoadError(f"cannot load adapter weights {file}: {exc}") from exc
        # A stack's levels are adapters of their own, loaded from their own files: only this one's count.
        missing = [key for key in result.missing_keys if "lora_" in key and f".{ADAPTER_NAME}." in key]
        if missing:
            raise AdapterLoadError(f"{file} lacks adapter weights: {missing[:3]}")

    # ------------------------------------------------------------------------------------ saving
    def adapter_config(self, directory: str | os.PathLike | None = None) -> dict:
        """The config of the adapter written into ``directory`` (None: not written; no relative level paths)."""
        lora = self.peft_model.peft_config[ADAPTER_NAME]
        stacked = {"stack": [level.record(directory) for level in self.stack], "q_on": self.q_on} if self.stack else {}
        return {
            "format_version": (TEMPLATE_FORMAT_VERSION if self.chat_template_kwargs
                               else STACKED_FORMAT_VERSION if self.stack else FORMAT_VERSION),
            "base_model": recorded_base_name(getattr(self.config, "name_or_path", None) or ""),
            "base_fingerprint": self.fingerprint,
            "quantization": self.quantization,
            "loss": {**self.loss.as_dict(), "backend": self.backend, "chunk_size": self.chunk_size},
            "lora": {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                     "target_modules": sorted(lora.target_modules)},
            "chat_template_kwargs": self.chat_template_kwargs,
            **stacked,
        }

    def write_adapter(self, directory: str | os.PathLike) -> None:
        """Writes the adapter files into an existing (staging) directory, for :meth:`save_pretrained`
        and Trainer checkpoints: the weights, ``qadapter_config.json`` and ``provenance.json``
        (:mod:`qadapter.library.provenance`); PEFT's model card is dropped, not ours to replace."""
        directory = Path(directory)
        self.peft_model.save_pretrained(directory, safe_serialization=True, selected_adapters=[ADAPTER_NAME])
        (directory / "README.md").unlink(missing_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.adapter_config(directory), indent=2) + "\n", encoding="utf-8")
        provenance.write(directory, provenance.build(self, self.provenance))

    def save_pretrained(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Saves the adapter's files into the directory ``path``, replacing only those files.

        Everything else in ``path`` (trainer checkpoints, the user's files) stays. Each file is
        renamed into place from a complete staged copy, so a crash leaves the old adapter or the
        new one, never a mix (``atomic.py``). A regular file at ``path`` is refused, and so is a
        non-empty directory that holds no adapter or checkpoint of ours unless ``overwrite``; so is a
        level of this adapter's own stack (the adapter it is trained on).
        """
        k = stack_level_at(path, [level.path for level in self.stack])
        if k is not None:
            raise ValueError(f"path {path} holds stack level {k} of this adapter: saving there would replace "
                             "the adapter it was trained on")
        atomic.save_files(path, self.write_adapter, is_ours=holds_adapter, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload Q-Adapter", private: bool | None = None,
                    token: str | None = None, revision: str | None = None):
        """Uploads the adapter's files, as :meth:`save_pretrained` writes them, and a model card to the
        hub model repository ``repo_id`` (created where missing) in one commit, and returns
        huggingface_hub's ``CommitInfo``; ``from_pretrained(repo_id)`` loads it back. A stacked adapter
        goes only where its levels came from the hub (its record pins each to a commit there)."""
        local = [k for k, level in enumerate(self.stack, 1) if level.hub is None]
        if local:
            raise ValueError(f"stack level(s) {local} of this adapter are local folders, which its record points to: "
                             "push them first and train on them from the hub (--on owner/name)")
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as staging:
            self.write_adapter(staging)
            (Path(staging) / "README.md").write_text(model_card(repo_id, self.adapter_config()), encoding="utf-8")
            return api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message,
                                     revision=revision)

    # ------------------------------------------------------------------------------------ module
    @property
    def config(self):
        return self.base_model.config

    @property
    def base_model(self) -> nn.Module:
        """The wrapped transformers model (its LoRA layers injected in place)."""
        return self.peft_model.get_base_model()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The frozen lm_head's weight, whole (gathered when FSDP2 shards it or ZeRO-3 partitions it)."""
        return full_weight(self.base_model.get_output_embeddings().weight)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs) -> None:
        """Trainer's hook for gradient checkpointing; non-reentrant by default (frozen embeddings)."""
        kwargs_ = activation_checkpointing_kwargs or {"use_reentrant": False}
        model = self.base_model
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs_, **kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs_)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    @property
    def q_networks(self) -> list[tuple[str, ...]]:
        """Per level of the stack (this adapter last), the PEFT adapters its Q network runs."""
        return q_networks([level.q_on for level in self.stack] + [self.q_on])

    @property
    def level_alphas(self) -> list[tuple[float, float]]:
        """``(alpha_0, alpha~)`` of each level of the stack, this adapter's last."""
        return [(level.alpha_0, level.alpha_tilde) for level in self.stack] + [(self.loss.alpha_0, self.loss.alpha_tilde)]

    def stack_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     **model_kwargs) -> list[torch.Tensor]:
        """Final hidden states ``[h_0, h_1, ..., h_L]`` of the frozen model and of each level's Q
        network (the stack's levels without grad, this adapter's with); ``model_kwargs``
        (``position_ids``, say) go to every forward."""
        return self._passes(input_ids, attention_mask, **model_kwargs).hidden

    def _passes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **model_kwargs) -> LevelPasses:
        return level_hidden(self.peft_model, input_ids, attention_mask, levels=self.q_networks[:-1],
                            logit_softcap=self.loss.logit_softcap, padding_free=self.padding_free, **model_kwargs)

    def packing(self):
        """How this model's passes pack a padded batch (:func:`~qadapter.library.packing.pack_batch` as
        its base takes it), once the base has been seen to keep packed sequences apart."""
        return checked_packing(self.peft_model, self.base_model)

    def loss_hidden(self, hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss's ``(base_hidden, q_hidden)`` of :meth:`stack_hidden`'s states: ``h_eff`` of the
        levels below this adapter (the frozen model's own for one adapter), and this adapter's."""
        return effective_hidden(hidden[:-1], self.level_alphas[:-1]), hidden[-1]

    def policy_hidden(self, hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, LossConfig]:
        """``(base_hidden, q_hidden, config)`` whose combination is this model's customized policy
        and whose base is the frozen model, for measures against the base (KL): for one adapter the
        loss's inputs and options, for a stack ``h_0`` and ``h_eff_L`` under :data:`PLAIN_LOSS`."""
        if not self.stack:
            return hidden[0], hidden[1], self.loss
        return hidden[0], effective_hidden(hidden, self.level_alphas), PLAIN_LOSS

    def step0_hidden(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """The Q hidden state of a fresh adapter (LoRA B = 0) in this adapter's place, of
        :meth:`stack_hidden`'s states: the frozen model's, or for ``q_on="parent"`` the parent's Q network's."""
        return hidden[-2] if self.q_on == "parent" else hidden[0]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **model_kwargs):
        """Final hidden states ``[B, T, d]`` the loss takes: the frozen side (no grad; for a stack
        ``h_eff`` of the levels below) and the adapter model's; ``model_kwargs`` (``position_ids``,
        say) go to every forward."""
        return self.loss_hidden(self.stack_hidden(input_ids, attention_mask, **model_kwargs))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, total_pairs: int | None = None,
                total_tokens: int | None = None) -> QAdapterModelOutput:
        """The Q-Adapter loss and its metrics for a batch ``[chosen..., rejected...]``; with
        ``total_pairs``/``total_tokens``, its share of a larger batch's loss (:func:`qadapter_loss`)."""
        if labels is None:
            raise ValueError("labels is required: the forward computes the preference loss (use generate() to decode)")
        passes = self._passes(input_ids, attention_mask)
        base_hidden, q_hidden = self.loss_hidden(passes.hidden)
        out = qadapter_loss(base_hidden, q_hidden, passes.weight, labels, config=self.loss, backend=self.backend,
                            chunk_size=self.chunk_size, total_pairs=total_pairs, total_tokens=total_tokens)
        return QAdapterModelOutput(*out, pass_tokens=passes.tokens)

    # -------------------------------------------------------------------------------- generation
    @property
    def policy(self) -> CombinedPolicy:
        """The customized policy as a transformers causal LM (:class:`~qadapter.library.policy.CombinedPolicy`),
        made once and kept (not a submodule: it shares this model's network)."""
        policy = self.__dict__.get("_policy")
        if policy is None:
            rows = StackedRows(self) if self.stack else RowPlan(self.peft_model, self.loss.alpha_tilde, self.loss.alpha_0)
            policy = self.__dict__["_policy"] = CombinedPolicy(self.base_model, rows)
        return policy

    @torch.no_grad()
    @one_call_at_a_time(lambda model: model.base_model)
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config: Any = None, *, compiled: bool | None = None, **kwargs):
        """Decodes the customized policy with transformers' ``generate``: it takes what that takes
        (a ``GenerationConfig`` and keyword arguments: greedy or sampling, ``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``repetition_penalty``, ``num_return_sequences``, ``num_beams``,
        ``stop_strings``, ``max_new_tokens``, streamers, logits processors, stopping criteria; seeded by
        ``torch.manual_seed``) and returns what it returns; prompts are left-padded. ``compiled``
        (default: on CUDA) decodes with a static cache and a compiled step.
        """
        input_ids, attention_mask = check_prompt(input_ids, attention_mask)
        if kwargs.get("stop_strings") is not None and "tokenizer" not in kwargs:
            kwargs["tokenizer"] = self.tokenizer
        weight, policy = self.lm_head_weight, self.policy
        policy.rows.kernel = select_combine(self.backend, weight.device, weight.dtype)  # once per generation
        with evaluation_mode(self.peft_model):  # sampling from the policy: no LoRA dropout
            return policy.generate(input_ids, generation_config, attention_mask=attention_mask,
                                        compiled=compiled, **kwargs)


def _peft_options_differing(path: Path, live) -> dict[str, tuple]:
    """PEFT's options that set a LoRA's shapes or scale (rsLoRA, rank and alpha patterns, DoRA, ...)
    where the adapter saved in ``path`` has other values than ``live`` (a ``LoraConfig``): weights of
    one loaded under the other would load and decode another policy. Unset and empty are alike."""
    try:
        saved = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the weights' own checks name what is missing or corrupted
    def plain(value):
        return json.loads(json.dumps(value, default=list)) or None

    return {key: (saved.get(key), getattr(live, key, None)) for key in SCALE_OPTIONS
            if isinstance(saved, dict) and plain(saved.get(key)) != plain(getattr(live, key, None))}


def select_combine(backend: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The combined-policy log-probs function for decoding: the backend's kernel where it declares one
    (Triton on CUDA), else the eager :func:`qadapter_kernels.combine_logits` (CPU; float64; a named
    backend that cannot run here, e.g. an adapter trained with ``cuda`` decoding on a laptop)."""
    if backend == "auto":
        record = registry.resolve(backend, torch.device(device), dtype)
    elif registry.status(backend).available:
        record = registry.get(backend)
    else:
        return combine_logits
    if record.combine is None or (dtype == torch.float64 and not record.float64):
        return combine_logits
    return record.combine


def load_saved_base(path: Path, config: dict, base_model: str | os.PathLike | nn.Module | None = None, *, torch_dtype=None,
                    device=None, quantization: Any = "saved") -> tuple[nn.Module, Any]:
    """The base model a saved adapter goes onto, and its tokenizer (None for a model object): by
    default the one its config names, loaded quantized as it was in training (``quantization="saved"``);
    another quantization, another base (by fingerprint) or a model object quantized otherwise is
    refused: the adapter learned a residual on that base's outputs."""
    saved = config["quantization"]
    tokenizer = None
    if isinstance(base_model, os.PathLike):  # a folder given as a Path is a folder given by name
        base_model = os.fspath(base_model)
    if base_model is None and not config["base_model"]:
        raise AdapterLoadError(f"{path / CONFIG_NAME} names no base model: pass base_model=")
    recorded = config["base_model"]
    if base_model is None and names_missing_folder(recorded):
        raise AdapterLoadError(f"the adapter in {path} was trained on the local base {recorded}, which is not here "
                               "(an adapter from another machine?): pass the same base as base_model= "
                               "(--base-model), a folder or its hub name; its fingerprint is checked")
    if base_model is None or isinstance(base_model, str):
        saved_way = isinstance(quantization, str) and quantization == "saved"
        wanted = saved if saved_way else quant.normalize(quantization, torch_dtype)
        named = str(torch_dtype).removeprefix("torch.") in quant.COMPUTE_DTYPES  # not None, not "auto"
        if saved_way and saved is not None and saved["method"] != "int8" and named:
            wanted = quant.normalize({**saved, "compute_dtype": torch_dtype})  # the compute dtype, as the CLI's
        check_quantization(path, saved, wanted)
        try:
            base_model, tokenizer = load_base(base_model or recorded, torch_dtype=torch_dtype, device=device,
                                              quantization=wanted)
        except OSError as exc:
            if base_model is not None or Path(recorded).is_absolute() or Path(recorded).exists():
                raise
            # Earlier versions recorded a local base by the path it was given: a relative one reads as a
            # hub name anywhere else, and transformers' error names neither the adapter nor the way out.
            raise AdapterLoadError(f"the adapter in {path} names its base {recorded!r}, which is no folder here and "
                                   f"could not be loaded as a hub model ({exc}); an adapter saved by an earlier "
                                   "version may name a local base by a path relative to where it was trained: pass "
                                   "the same base as base_model= (--base-model), a folder or its hub name; its "
                                   "fingerprint is checked") from exc
    given = quant.model_quantization(base_model)
    check_quantization(path, saved, given)
    check_base(path, config, base_fingerprint(base_model), given)
    return base_model, tokenizer


def levels_on(on: str | os.PathLike) -> list[Level]:
    """The stack a new adapter trained on the saved adapter ``on`` sits on: ``on``'s own levels, then
    ``on`` itself, recorded with the sha256 of its files and its alpha options."""
    try:
        path = locate_adapter(on)
        atomic.recover(path, reading=True)  # finishes a save that a crash interrupted
        config = read_adapter_config(path)
    except AdapterLoadError as exc:
        raise AdapterLoadError(f"on: {exc}") from exc
    loss = LossConfig.from_options(**{k: v for k, v in config["loss"].items() if k in LossConfig.names()})
    own = Level(path=str(path.resolve()), sha256=adapter_digest(path, LEVEL_FILES), alpha_0=loss.alpha_0,
                alpha_tilde=loss.alpha_tilde, q_on=config["q_on"], hub=hub_pin(on, path))
    return [Level.from_dict(record, str(path), path) for record in config["stack"]] + [own]


def _are_levels(on: object) -> bool:
    """Whether ``on`` is the stack :func:`levels_on` found (its levels, the parent last), not a place."""
    return isinstance(on, Sequence) and not isinstance(on, str) and bool(on) and all(
        isinstance(level, Level) for level in on)


def stack_level_at(path: str | os.PathLike, level_paths: Iterable[str | os.PathLike]) -> int | None:
    """Which level (from 1) of a stack whose levels are saved at ``level_paths`` the folder ``path``
    holds, or None: saving an adapter there would replace one it is trained on."""
    target = Path(path).resolve()
    return next((k for k, level in enumerate(level_paths, 1) if Path(level).resolve() == target), None)


def recorded_base_name(name: str) -> str:
    """The base as an adapter records it: a local folder by its absolute path (a relative one would
    name another folder, or a hub model, from anywhere else), a hub name or the default as given."""
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def check_stackable(logit_softcap: float | None, argument: str) -> None:
    """Stacking needs an uncapped head (a level's policy is a softmax of one hidden state)."""
    if logit_softcap is not None:
        raise ValueError(
            f"{argument}: stacking adapters needs an uncapped head, and this model soft-caps its logits "
            f"(logit_softcap={logit_softcap:g}): tanh is not linear, so a level's policy is not a "
            "softmax of one hidden state and the fused loss cannot take it as the frozen side")


def find_level(level: Level, k: int, argument: str, fingerprint: str, quantization: dict | None) -> Path:
    """Where stack level ``k`` (from 1) of the adapter ``argument`` names is: found, checked to be on
    this base (``fingerprint``, ``quantization``) and unchanged since it was recorded."""
    try:
        path = level.location()  # beside the adapter on it if the stack moved, else where recorded
        config = read_adapter_config(path)
        check_base(path, config, fingerprint, quantization)
        check_quantization(path, config["quantization"], quantization)
    except (AdapterLoadError, FileNotFoundError) as exc:
        raise AdapterLoadError(f"{argument}: stack level {k}: {exc}") from exc
    if not level.is_at(path):
        # What is found first is the level: a changed copy beside the stack is refused, not passed over.
        recorded = Path(level.path)
        intact = (recorded.resolve() != path.resolve() and recorded.is_dir() and level.is_at(recorded))
        raise AdapterLoadError(f"{argument}: stack level {k}, the adapter in {path}, has changed since this "
                               f"adapter was trained on it (sha256 of {', '.join(LEVEL_FILES)} differs)"
                               + (f"; its recorded path {recorded} holds it as trained (move the folder at {path} "
                                  "away to load the stack from there)" if intact else ""))
    return path


def load_lora(model: nn.Module, path: Path, name: str, what: str, *, frozen: bool = False) -> nn.Module:
    """The saved LoRA in ``path`` as the PEFT adapter ``name`` of ``model`` (a ``PeftModel``, or a bare
    base, which becomes one), its weights checked (``what`` names it in errors); ``frozen`` (a stack
    level): its weights made buffers. Returns the ``PeftModel``."""
    from peft import PeftModel

    try:
        check_saved_lora(path)
    except AdapterLoadError as exc:
        raise AdapterLoadError(f"{what}: {exc}") from exc
    with warnings_held_while_checked(), generators_kept(model):
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            else:
                base = model
                model = lend(base, lambda: PeftModel.from_pretrained(base, path, adapter_name=name))
        except BaseInUse:
            raise
        except Exception as exc:  # safetensors and PEFT raise several types for unreadable files
            raise AdapterLoadError(f"{what}: the weights in {path} cannot be loaded (corrupted or incomplete?): "
                                   f"{exc}") from exc
        check_adapter_weights(model, path, adapter_name=name)
    if frozen:
        freeze_level(model, name)
    return model


def check_base(path: Path, config: dict, fingerprint: str, quantization: dict | None, *,
               given: str = "the one given") -> None:
    """An adapter goes only onto the base it was trained on: the saved base fingerprint must be
    ``fingerprint`` (the base's it is loaded onto, quantized as ``quantization`` says; ``given``
    says which base that is)."""
    if fingerprint == config["base_fingerprint"]:
        return
    saved = config["quantization"]
    hint = ""
    if saved and quantization and saved["method"] != "int8" and saved["compute_dtype"] != quantization["compute_dtype"]:
        # A 4-bit base's weights are cast to the compute dtype before they are quantized: a checkpoint
        # whose weights are not exact in both dtypes (float32 ones, for bfloat16) gets other 4-bit codes.
        hint = (f" or the same base quantized from {quantization['compute_dtype']} weights instead of "
                f"{saved['compute_dtype']} ones, whose 4-bit codes differ: load it with the compute dtype "
                f"{saved['compute_dtype']} (--compute-dtype {saved['compute_dtype']})")
    elif not saved and not quantization:
        hint = (", or the same base loaded in float16 on one side and not on the other (float16 rounds float32 "
                "weights otherwise than bfloat16 does): load it in the dtype the adapter was trained with")
    raise AdapterLoadError(
        f"the adapter in {path} was trained on another base model, {config['base_model']!r} (fingerprint "
        f"{config['base_fingerprint']}), than {given} (fingerprint {fingerprint}){hint}")


def check_quantization(path: Path, saved: dict | None, given: dict | None) -> None:
    """An adapter goes only onto a base quantized as its own was (the method and, for 4-bit, double
    quantization; the compute dtype may differ where the 4-bit codes come out the same, which the
    fingerprint checks): refused otherwise, naming both."""
    def stored(q):
        return None if q is None else (q["method"], q.get("double_quant"))

    if stored(saved) != stored(given):
        trained_on = "a dense base" if saved is None else f"a base quantized as {quant.describe(saved)}"
        raise AdapterLoadError(f"the adapter in {path} was trained on {trained_on}; the base given is "
                               f"{quant.describe(given)} (load it as the adapter was trained)")


# catch_warnings saves and restores the warnings module's process-wide state: two loads overlapping
# from two threads would restore each other's, leaving a filter and a recorder in place for good.
_WARNINGS_HELD = threading.RLock()


@contextmanager
def warnings_held_while_checked():
    """Holds the warnings of loading an adapter until its checks pass, and drops them when a check
    refuses it: PEFT warns of every missing key (hundreds on a real model) before
    :func:`check_adapter_weights` says in one line what is wrong. One load holds them at a time."""
    with _WARNINGS_HELD, warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        yield
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


@contextmanager
def generators_kept(model: nn.Module):
    """The global random generators (the CPU's and those of the GPUs ``model`` is on) as they were
    after loading saved weights into it: PEFT initializes each LoRA at random before the saved
    weights replace it, which would shift a caller's seeded samples, dropout or initialization."""
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"} - {None})
    with torch.random.fork_rng(devices=devices):
        yield


def check_adapter_weights(peft_model: nn.Module, path: Path, adapter_name: str = ADAPTER_NAME) -> None:
    """The saved LoRA weights are exactly those the saved config describes: no missing, extra or
    renamed tensor (PEFT would only warn, and the model would act as the bare base)."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    # Without embedding layers (not a Q-Adapter's targets): "auto" would read the base's config at the
    # path PEFT recorded, which on another machine is not there.
    expected = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False))
    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            saved = set(f.keys())
    except Exception as exc:  # safetensors' own error type for a truncated or garbled file
        raise AdapterLoadError(f"{path / WEIGHTS_NAME} cannot be read (corrupted or incomplete?): {exc}") from exc
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise AdapterLoadError(
            f"{path / WEIGHTS_NAME} does not match its adapter config: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )


def check_prompt(input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [B, T]; got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one prompt token per row")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):  # transformers' generate takes generation_config second
        hint = " (pass it as generation_config=...)" if type(attention_mask).__name__ == "GenerationConfig" else ""
        raise TypeError(f"attention_mask (the second argument) must be a tensor [B, T] or None; got "
                        f"{type(attention_mask).__name__}{hint}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}; got {tuple(attention_mask.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded (attention_mask[:, -1] is 0 for some row)")
    return input_ids.long(), attention_mask.long()
