"""What a saved adapter is on disk, read and checked before any base model loads: its file names,
format versions, its config (loss options, base, quantization, stack levels) and the records of the
levels it is stacked on.

It imports neither transformers nor PEFT, on purpose: ``qadapter info`` reads an adapter with this
alone, and every loader checks a config here before it spends anything on a base.

An adapter is named by a local folder or a hub model repository (``owner/name``, pinned with
``owner/name@revision``): :func:`locate_adapter` turns either into a local folder, downloading
only the adapter's own files into the hub cache, so everything after it reads local files.

A child records its levels (path, a sha256 of the files, alpha options, ``q_on``); loading refuses a
level whose files changed or that was trained on another base. Each level is recorded by its
absolute path and by its path relative to the child's directory, tried first (:meth:`Level.location`):
a stack moved or copied as a whole (``level1/`` and ``level2/`` side by side) finds its own levels,
not the originals; a level taken from the hub is also recorded by its commit there, looked up last.
The sha256 makes every lookup safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from qadapter_kernels import LossConfig, registry
from qadapter_kernels.inputs import check_chunk_size

from . import atomic
from . import quantization as quant
from .atomic import STAGING_PREFIX
from .data import check_template_options
from .lora import unsupported_lora_options
from .provenance import PROVENANCE_NAME

CONFIG_NAME = "qadapter_config.json"
FORMAT_VERSION = 1
STACKED_FORMAT_VERSION = 2  # a stacked adapter: a reader that cannot load its levels refuses it
# An adapter with chat template options, stacked or not: a reader that predates them would render its
# prompts without them (another answer, no error), so it refuses it.
TEMPLATE_FORMAT_VERSION = 3
# Keys of the saved config's "loss" section besides LossConfig's fields.
RUN_KEYS = ("backend", "chunk_size")
WEIGHTS_NAME = "adapter_model.safetensors"
# What a Trainer checkpoint of a Q-Adapter holds, its adapter's config or one of Trainer's files (any
# one of them makes a checkpoint-<step> folder one).
CHECKPOINT_FILES = (CONFIG_NAME, "trainer_state.json", "optimizer.pt", "scheduler.pt", "training_args.bin")
# What a hub repository of an adapter gives (PEFT's config too: PEFT reads it); never the
# checkpoints or anything else a pushed training folder may hold.
HUB_FILES = (WEIGHTS_NAME, CONFIG_NAME, "adapter_config.json", PROVENANCE_NAME)
# What a stack level's sha256 covers: what its policy is (weights, loss options, base), not its history.
LEVEL_FILES = (WEIGHTS_NAME, CONFIG_NAME)


class AdapterLoadError(ValueError):
    """A saved adapter cannot be used: missing or corrupted files, or another base model."""


def run_options(loss: LossConfig | None = None, backend: str = "auto", chunk_size: int | None = None,
                **loss_options) -> tuple[LossConfig, str, int | None]:
    """The validated loss options, backend and chunk size of a model (or of its saved config)."""
    chunk_size = check_chunk_size(chunk_size)
    config = LossConfig.from_options(loss, **loss_options)
    return config, registry.check_options(backend, config.grad_filter_eps), chunk_size


Q_ON = ("parent", "base")


# The keys of a stack level's record, all required; "relative_path" and "hub" are optional (records
# saved before them lack them; readers that predate them ignore them, so the format version stays).
LEVEL_KEYS = ("path", "sha256", "alpha_0", "alpha_tilde", "q_on")


@dataclass(frozen=True)
class Level:
    """One saved adapter under the one being trained, as the child's config records it (:meth:`record`)."""

    path: str  # the adapter directory, absolute: where it was when the child was built, or where it was found
    sha256: str  # of its weights and config files (:func:`adapter_digest`)
    alpha_0: float
    alpha_tilde: float
    q_on: str | None  # how its Q network was built (None: the first level, on the base)
    # The record's "relative_path" resolved against the directory of the adapter that recorded it: where
    # the level is when the stack moved as a whole, tried before ``path``. None: not recorded.
    nearby: str | None = field(default=None, compare=False)
    # Where the hub has it, pinned to a commit (``owner/name@commit``): a level that was loaded from the
    # hub is found there again on a machine without the local copy. None: a local folder.
    hub: str | None = field(default=None, compare=False)

    def as_dict(self) -> dict:
        return {key: getattr(self, key) for key in LEVEL_KEYS}

    def record(self, directory: str | os.PathLike | None) -> dict:
        """The level as the config of an adapter written into ``directory`` records it: with
        ``relative_path``, its path relative to that adapter's directory (None where there is none:
        no directory, another drive on Windows). A hidden staging directory of
        :func:`atomic.save_files` lies inside the adapter's directory: the path is relative to that one.
        A level from the hub has none: it sits in the hub cache, not beside the stack, and is found by
        its commit."""
        relative = None
        if directory is not None and self.hub is None:
            home = Path(directory).resolve()
            if home.name.startswith(atomic.STAGING_PREFIX):
                home = home.parent
            try:  # with "/" between its parts, as every platform reads it
                relative = os.path.relpath(self.path, home).replace(os.sep, "/")
            except ValueError:
                pass
        return {**self.as_dict(), "relative_path": relative, "hub": self.hub}

    @classmethod
    def from_dict(cls, record: dict, where: str, directory: str | os.PathLike | None = None) -> Level:
        """The level of ``record``, read from the config of the adapter in ``directory`` (None: only checked)."""
        try:
            level = cls(**{k: record[k] for k in LEVEL_KEYS})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: a stack level must be an object with path, sha256, alpha_0, alpha_tilde, "
                             f"q_on; got {record!r}") from exc
        relative, hub = record.get("relative_path"), record.get("hub")
        for key, value in (("relative_path", relative), ("hub", hub)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: a stack level's {key} must be a string or null; got {value!r}")
        level = replace(level, hub=hub)
        check_q_on(level.q_on, f"{where}: a stack level's q_on", allow_none=True)
        try:
            LossConfig.from_options(alpha_0=level.alpha_0, alpha_tilde=level.alpha_tilde)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: a stack level's {exc}") from exc
        if relative is None or directory is None:
            return level
        relative = relative.replace("\\", "/")  # as Windows recorded it before "/" was written
        return replace(level, nearby=str((Path(directory).resolve() / relative).resolve()))

    def found_at(self, path: str | os.PathLike) -> Level:
        """The level as it was found at ``path``: where a save of the adapter on it records it."""
        return replace(self, path=str(Path(path).resolve()), nearby=None)

    def is_at(self, path: str | os.PathLike) -> bool:
        """Whether the adapter in ``path`` is the one recorded: the same sha256 of its LEVEL_FILES."""
        return adapter_digest(path, LEVEL_FILES) == self.sha256

    def location(self) -> Path:
        """Where the level is: at its path relative to the adapter that recorded it if anything is
        there (the stack moved or copied as a whole), else at its recorded absolute path, else (a
        level loaded from the hub) at its commit on the hub. Each is then checked against the sha256.
        FileNotFoundError naming every place tried when none has it."""
        for place in (self.nearby, self.path):
            if place is not None and Path(place).is_dir():
                return Path(place)
        if self.hub is not None:
            try:
                return locate_adapter(self.hub)
            except AdapterLoadError as exc:
                raise FileNotFoundError(f"no adapter at {self.nearby} (its place relative to the adapter trained "
                                        f"on it) nor at {self.path} (its recorded path), and {exc}") from exc
        if self.nearby is None:
            raise FileNotFoundError(f"no adapter at {self.path}, its recorded path (an older record, without the "
                                    "relative one): the level must sit there")
        raise FileNotFoundError(f"no adapter at {self.nearby} (its place relative to the adapter trained on it) "
                                f"nor at {self.path} (its recorded path): a stack's levels must be moved or copied "
                                "along with it, keeping their places relative to each other, or sit at their "
                                "recorded paths")


def check_q_on(q_on, name: str = "q_on", *, allow_none: bool = False) -> str | None:
    if q_on is None and allow_none:
        return None
    if q_on not in Q_ON:
        raise ValueError(f"{name} must be one of {Q_ON}; got {q_on!r}")
    return q_on


def adapter_digest(path: str | os.PathLike, files: Sequence[str]) -> str:
    """sha256 of the named files of an adapter directory, in order (names and contents)."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode())
        with open(Path(path) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def locate_adapter(adapter: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of ``adapter``: the folder itself where one exists at that path, else the
    snapshot of the hub model repository it names (``owner/name``, or ``owner/name@revision``, or
    ``revision=``: a branch, tag or commit), downloaded into the hub cache or found there offline
    (``HF_HUB_OFFLINE=1``). AdapterLoadError naming ``adapter`` when neither gives one."""
    path = Path(adapter)
    if revision is not None and (not isinstance(adapter, str) or "@" in adapter):
        raise ValueError(f"revision= names a revision of a hub repository, once: adapter {str(adapter)!r} "
                         f"{'has one already' if isinstance(adapter, str) else 'is a path'}")
    if path.exists() and revision is None:
        return path
    if revision is not None:
        adapter = f"{adapter}@{revision}"
    repo_id, _, revision = adapter.partition("@") if isinstance(adapter, str) else ("", "", "")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        validate_repo_id(repo_id)
    except (ImportError, HFValidationError):
        raise AdapterLoadError(f"adapter {str(adapter)!r}: no such folder") from None
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=list(HUB_FILES)))
    except Exception as exc:  # huggingface_hub raises a family of errors: not found, gated, offline, HTTP
        snapshot = _cached_snapshot(repo_id, revision)
        if snapshot is None:
            raise AdapterLoadError(f"adapter {adapter!r}: no such folder here, and the hub gave no repository "
                                   f"{repo_id!r}{f' at revision {revision!r}' if revision else ''}: "
                                   f"{type(exc).__name__}: {exc}") from exc
    if not (snapshot / CONFIG_NAME).is_file():
        raise AdapterLoadError(f"adapter {adapter!r}: the hub repository {repo_id!r} holds no Q-Adapter "
                               f"({CONFIG_NAME} is missing; a plain PEFT adapter is not a Q-Adapter)")
    return snapshot


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """Offline (``HF_HUB_OFFLINE``), the hub cache's snapshot of ``repo_id`` at ``revision``, or None:
    huggingface_hub 1.x asks the hub for the files of a pinned revision even where its cache holds them.
    Online, None: what the hub said stands."""
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        return None
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=list(HUB_FILES),
                                      local_files_only=True))
    except Exception:  # not in the cache either
        return None


def hub_pin(adapter: str | os.PathLike, path: Path) -> str | None:
    """``owner/name@commit`` for an ``adapter`` that :func:`locate_adapter` found on the hub at
    ``path`` (a snapshot folder is named by its commit), else None (a local folder)."""
    if not isinstance(adapter, str) or Path(adapter).exists():
        return None
    return f"{adapter.partition('@')[0]}@{path.name}"


def model_card(repo_id: str, config: dict) -> str:
    """The README.md of an adapter pushed to the hub: its base and loss options, and how to use it."""
    base = config["base_model"]
    metadata = "library_name: qadapter-kernels\ntags:\n- q-adapter\n- peft\n- lora\n"
    if "/" in base and not Path(base).is_absolute():  # a hub name (a local folder names nothing there)
        metadata += f"base_model: {base}\n"
    loss = {k: config["loss"][k] for k in ("alpha_0", "alpha_tilde") if k in config["loss"]}
    # How its prompts are rendered (qadapter applies them itself): a chat rendered otherwise is not what it learned.
    options = config.get("chat_template_kwargs")
    rendered = (f" Its chats are rendered with the chat template options `{json.dumps(options)}`, as it was "
                "trained; qadapter applies them wherever it answers." if options else "")
    return (f"---\n{metadata}---\n\n# {repo_id.rpartition('/')[2]}\n\n"
            f"A Q-Adapter (Li et al., ICLR 2025) on the frozen base `{base or '(unnamed)'}` "
            f"(quantization: {config['quantization']}; {loss}): a LoRA residual Q-function whose "
            f"combination with the base is the customized policy.{rendered} Its training data and options are in "
            f"`{PROVENANCE_NAME}`. With qadapter-kernels installed:\n\n```bash\n"
            f'qadapter generate --adapter {repo_id} --prompt "Hello!"\n```\n\n'
            f"```python\nfrom qadapter import QAdapterModel\nmodel = QAdapterModel.from_pretrained({repo_id!r})\n```\n")


def holds_adapter(path: Path) -> bool:
    """Whether a directory holds a saved adapter or the trainer checkpoints of one (in ``checkpoints``,
    as ``qadapter train`` writes them, or beside it)."""
    path = Path(path)
    checkpoints = path / "checkpoints"  # Trainer's output folder: made when training starts, filled as it saves
    return ((path / CONFIG_NAME).is_file() or bool(checkpoint_folders(path))
            or checkpoints.is_dir() and (not any(checkpoints.iterdir()) or bool(checkpoint_folders(checkpoints))))


def checkpoint_folders(run_dir: str | os.PathLike) -> list[Path]:
    """Trainer's checkpoint folders of a Q-Adapter in ``run_dir`` (``checkpoint-<step>`` holding its
    adapter or Trainer's files, a save begun, or nothing yet), by step (checkpoint-10 after
    checkpoint-9); a folder of that name holding other things is not one."""
    def ours(folder: Path) -> bool:
        return any(entry.name in CHECKPOINT_FILES or entry.name.startswith((STAGING_PREFIX, "rng_state"))
                   for entry in folder.iterdir()) or not any(folder.iterdir())

    found = [(int(m.group(1)), path) for path in Path(run_dir).glob("checkpoint-*")
             if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name)) and ours(path)]
    return [path for _, path in sorted(found)]


def read_adapter_config(path: Path) -> dict:
    file = path / CONFIG_NAME
    if not file.is_file():
        checkpoints = checkpoint_folders(path / "checkpoints")
        unfinished = (f"; it holds the checkpoints of a run not finished: `qadapter train --resume` finishes it, or "
                      f"load a checkpoint ({checkpoints[-1]})") if checkpoints else ""
        raise AdapterLoadError(f"{path} is not a saved Q-Adapter: {CONFIG_NAME} is missing{unfinished}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{file} is corrupted: {exc}") from exc
    missing = [k for k in ("format_version", "base_model", "base_fingerprint", "loss") if k not in config]
    if missing:
        raise AdapterLoadError(f"{file} lacks {missing}")
    version = config["format_version"]
    if version not in (FORMAT_VERSION, STACKED_FORMAT_VERSION, TEMPLATE_FORMAT_VERSION):
        raise AdapterLoadError(f"{file} has format_version {version}; this version reads {FORMAT_VERSION}, "
                               f"{STACKED_FORMAT_VERSION} (stacked) and {TEMPLATE_FORMAT_VERSION} (chat template options)")
    config.setdefault("stack", [])
    config.setdefault("q_on", None)
    try:  # the levels' records, checked before any base loads
        if not isinstance(config["stack"], list) or (
                version != TEMPLATE_FORMAT_VERSION and bool(config["stack"]) != (version == STACKED_FORMAT_VERSION)):
            raise ValueError(f"'stack' must be a non-empty list exactly when format_version is {STACKED_FORMAT_VERSION}")
        for record in config["stack"]:
            Level.from_dict(record, str(file))
        if config["stack"]:
            check_q_on(config["q_on"])
    except ValueError as exc:
        raise AdapterLoadError(f"{file} holds an invalid stack: {exc}") from exc
    # Missing keys (adapters saved before ignore_index was stored) take LossConfig's defaults.
    if not isinstance(config["loss"], dict):
        raise AdapterLoadError(f"{file}: 'loss' must be an object of loss options; got {config['loss']!r}")
    known = (*LossConfig.names(), *RUN_KEYS)
    config["loss"] = {k: v for k, v in config["loss"].items() if k in known}
    try:  # every value checked now, before a base model is loaded for it
        run_options(**config["loss"])
    except (TypeError, ValueError) as exc:
        raise AdapterLoadError(f"{file} holds an invalid option: {exc}") from exc
    try:  # adapters saved before quantized bases were supported: a dense base
        config["quantization"] = quant.normalize(config.get("quantization"))
    except quant.QuantizationError as exc:
        raise AdapterLoadError(f"{file} holds an invalid quantization: {exc}") from exc
    try:  # adapters saved before template options were recorded: none
        config["chat_template_kwargs"] = check_template_options(config.get("chat_template_kwargs"))
    except ValueError as exc:
        raise AdapterLoadError(f"{file} holds invalid chat template options: {exc}") from exc
    if not (path / WEIGHTS_NAME).is_file():
        raise AdapterLoadError(f"{path} is an incomplete adapter: {WEIGHTS_NAME} is missing")
    return config


def check_saved_lora(path: Path, config: dict | None = None) -> None:
    """PEFT's config of the adapter in ``path``, before PEFT reads it: options under which the base is
    not left untouched (:func:`qadapter.library.lora.unsupported_lora_options`: a foreign adapter's)
    are refused by name; and since PEFT allocates every LoRA matrix at its config's rank before it
    reads the weights, a rank that is not the weights' own (an edited or foreign
    adapter_config.json), or not the one ``config`` (ours) records, is refused before anything is
    allocated for it, so loading costs no more memory than the weights file holds. Reads the
    weights' header only."""
    from safetensors import SafetensorError, safe_open

    peft_file = path / "adapter_config.json"
    try:
        peft = json.loads(peft_file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AdapterLoadError(f"{path} is an incomplete adapter: PEFT's adapter_config.json is missing, so its "
                               "weights cannot be loaded") from exc
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"{peft_file} is corrupted: {exc}") from exc
    problems = unsupported_lora_options(peft) if isinstance(peft, dict) else []
    if problems:
        raise AdapterLoadError(f"{peft_file}: {'; '.join(problems)}; a Q-Adapter's LoRA leaves the base untouched")
    try:
        with safe_open(path / WEIGHTS_NAME, framework="numpy") as weights:
            ranks = {weights.get_slice(name).get_shape()[0] for name in weights.keys() if ".lora_A." in name}
    except (OSError, ValueError, SafetensorError) as exc:  # a header cut short, a Git LFS pointer, ...
        raise AdapterLoadError(f"the weights in {path} cannot be loaded (corrupted or incomplete?): {WEIGHTS_NAME} "
                               f"cannot be read: {exc}") from exc
    asked = [peft.get("r"), *dict(peft.get("rank_pattern") or {}).values()] if isinstance(peft, dict) else [None]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in asked):
        raise AdapterLoadError(f"{peft_file}: r and rank_pattern's ranks must be integers >= 1; got {asked}")
    ours = ((config or {}).get("lora") or {}).get("r")
    if max(asked) > max(ranks, default=0) or (ours is not None and ours != peft["r"]):
        raise AdapterLoadError(f"{peft_file} asks for LoRA rank {max(asked)} (r {peft['r']}), which is not the "
                               f"adapter's: its weights have rank {sorted(ranks) or 'none'}, {CONFIG_NAME} "
                               f"records r {ours}")


def stack_levels_found(path: Path, config: dict) -> list[dict]:
    """Where each stack level of the adapter in ``path`` (its ``config``) is now, and what loading it
    would refuse (gone, changed since, unreadable), found without loading anything (``qadapter info``)."""
    found = []
    for k, record in enumerate(config["stack"], 1):
        level, problem, where = Level.from_dict(record, str(path), path), None, None
        try:
            where = level.location()
            if not level.is_at(where):
                problem = f"{where} has changed since this adapter was trained on it (sha256 differs)"
        except OSError as exc:  # FileNotFoundError names both places tried; a file gone names the file
            problem = str(exc)
        found.append({"level": k, "found_at": None if where is None else str(where), "problem": problem})
    return found
