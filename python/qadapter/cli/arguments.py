"""What the commands share: argument types that name what they expect, the options every command
that loads a base or an adapter takes (quantization, ``--dtype``, ``--base-model``), options generated from a
dataclass, and the one-line usage error (exit 2, argparse's convention)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from ..library.defaults import MAX_LENGTH

ADAPTER_HELP = "a saved Q-Adapter: its directory, or a hub repository owner/name[@revision]"


def usage_error(command: str, message: str):
    print(f"qadapter {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def result_stdout():
    """Yields the command's stdout, for its result alone (``| jq``), while everything else printed or
    logged there meanwhile goes to stderr: Trainer's log lines, and libraries whose loggers write on
    stdout (DeepSpeed's, whose accelerator notice comes as Trainer starts)."""
    result = sys.stdout
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    on_stdout = [handler for logger in loggers for handler in logger.handlers
                 if isinstance(handler, logging.StreamHandler) and handler.stream is result]
    for handler in on_stdout:
        handler.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # a logger made meanwhile takes stderr for good
            yield result
    finally:
        for handler in on_stdout:
            handler.setStream(result)


def named(name: str):
    """argparse names a type by its ``__name__`` when a value does not parse ("invalid positive
    integer value: 'abc'"); the helpers below get readable names instead of their own."""
    def rename(parse):
        parse.__name__ = name
        return parse
    return rename


def ranged(name: str, convert: Callable[[str], float], holds: Callable[[float], bool], expected: str):
    """An argparse type: ``convert`` the text, refuse a value that does not hold, saying what it must be."""
    @named(name)
    def parse(text: str):
        value = convert(text)
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {expected}; got {text}")
        return value
    return parse


positive_int = ranged("positive integer", int, lambda v: v > 0, "a positive integer")
non_negative_int = ranged("non-negative integer", int, lambda v: v >= 0, "an integer >= 0")
port_number = ranged("port number", int, lambda v: 1 <= v <= 65535, "a TCP port in 1..65535")
positive_float = ranged("positive number", float, lambda v: 0 < v < math.inf, "> 0 and finite")
finite_float = ranged("finite number", float, math.isfinite, "a finite number (nan and inf compare with nothing)")
non_negative_float = ranged("non-negative number", float, lambda v: 0 <= v < math.inf, ">= 0 and finite")
probability = ranged("probability", float, lambda v: 0 < v <= 1, "in (0, 1]")
unit_fraction = ranged("number in [0, 1]", float, lambda v: 0 <= v <= 1, "in [0, 1]")
torch_seed = ranged("seed", int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64 - 1]")  # torch.manual_seed's range


@named("JSON object")
def template_options(text: str) -> dict:
    """The chat template's options, as ``--chat-template-kwargs '{"enable_thinking": false}'``."""
    from ..library.data import parse_template_options

    try:
        return parse_template_options(text, "the value")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_template_options(p) -> None:
    p.add_argument("--chat-template-kwargs", type=template_options, default={}, metavar="JSON",
                   help="the chat template's options, over those the adapter was trained with (its "
                        "chat_template_kwargs), e.g. '{\"enable_thinking\": false}' (Qwen3)")


@named("UTF-8 text")
def utf8_text(value: str) -> str:
    """Text as given. A byte Python could not decode (a Latin-1 terminal's ``é``) comes as a lone
    surrogate, which no tokenizer encodes: refused here, naming the byte."""
    for i, char in enumerate(value):
        if "\udc80" <= char <= "\udcff":
            raise argparse.ArgumentTypeError(f"byte {ord(char) - 0xdc00:#x} at character {i} is not UTF-8 text "
                                             "(set the terminal to UTF-8)")
        if "\ud800" <= char <= "\udfff":
            raise argparse.ArgumentTypeError(f"character {i} is a lone surrogate ({char!r}), not text")
    return value


@named("non-empty text")
def non_empty_text(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (an empty stop string would stop at once)")
    return utf8_text(text)


def add_dataclass_options(parser: argparse.ArgumentParser, options_class: type) -> None:
    """One ``--field-name`` option per field of a dataclass, with its type, default and metadata
    (``help``, ``choices``; ``positive``: values > 0; ``non_negative``: values >= 0; ``flag``: another
    option name; ``cli=False``: no option of its own, the command sets it from others, as the
    quantization flags set ``quantization``)."""
    types = typing.get_type_hints(options_class)
    for f in fields(options_class):
        if not f.metadata.get("cli", True):
            continue
        kind = next(t for t in typing.get_args(types[f.name]) or (types[f.name],) if t is not type(None))
        if f.metadata.get("positive"):
            kind = {int: positive_int, float: positive_float}[kind]
        if f.metadata.get("non_negative"):
            kind = {int: non_negative_int, float: non_negative_float}[kind]
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if kind is bool:  # a switch, off by default
            parser.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
            continue
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=f.metadata.get("choices"),
                            metavar=None if "choices" in f.metadata else flag[2:].replace("-", "_").upper(),
                            help=f.metadata["help"] + (" (default: %(default)s)" if f.default is not None else ""))


def options_from(args: argparse.Namespace, options_class: type, **given):
    """The dataclass ``options_class`` filled from the options :func:`add_dataclass_options` added,
    and the fields without an option of their own from ``given``."""
    return options_class(**{f.name: getattr(args, f.name) for f in fields(options_class) if f.metadata.get("cli", True)},
                         **given)


def output_directory(command: str, path: str) -> Path:
    """The directory a command writes into at its end: a file there, or above it, is refused now,
    not after the work. A link to nothing (its target moved) is refused by name: it could be made no directory."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.exists():
        usage_error(command, f"--output {path}: {existing} is a link to {existing.readlink()}, which does not exist")
    if not existing.is_dir():
        usage_error(command, f"--output {path}: {existing} is a file, not a directory")
    return path


def add_quantization_options(p, loads: str, compute_default: str = "bfloat16 on CUDA, float32 on a CPU") -> None:
    """``--load-in-4bit`` / ``--load-in-8bit`` (bitsandbytes, the lm_head dense) and the 4-bit compute
    dtype: every command that loads a base takes the same three options (:func:`quantization_from` reads them)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--load-in-4bit", action="store_true",
                       help=f"{loads} quantized by bitsandbytes to 4-bit NF4 with double quantization (QLoRA-style)")
    group.add_argument("--load-in-8bit", action="store_true",
                       help=f"{loads} quantized by bitsandbytes with LLM.int8")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"),
                   help=f"the 4-bit layers' compute dtype (default: {compute_default})")


DTYPES = ("auto", "bfloat16", "float16", "float32")


def add_dtype_option(p) -> None:
    """``--dtype``: the dtype a command loads its dense base in (``auto``: its checkpoint's)."""
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="the dtype the base loads in (default: auto, its checkpoint's); an adapter loads onto its "
                        "base in float32 or bfloat16 alike, not always in float16")


def dtype_from(args):
    """The torch dtype ``--dtype`` names, or None for the checkpoint's own."""
    import torch

    return None if args.dtype == "auto" else getattr(torch, args.dtype)


def add_base_model_option(p, text: str = "override the base model named in the adapter's config") -> None:
    """The base of a command that loads saved adapters: ``--base-model``, or ``--model`` as train names it."""
    p.add_argument("--base-model", "--model", dest="base_model", help=text)


def quantization_from(args, default=None):
    """The quantization the quantization options name (a dict), or ``default`` when none is given;
    for a saved adapter (``default="saved"``), ``--compute-dtype`` alone is its 4-bit base's with
    that compute dtype."""
    if args.load_in_4bit:
        return {"method": "nf4", "compute_dtype": args.compute_dtype}
    if args.compute_dtype and default == "saved" and not args.load_in_8bit:
        return _saved_with_compute_dtype(args)
    if args.compute_dtype:
        usage_error(args.command, "--compute-dtype applies with --load-in-4bit"
                                  + (" (LLM.int8 takes no compute dtype)" if args.load_in_8bit else ""))
    return "8bit" if args.load_in_8bit else default


def _saved_with_compute_dtype(args) -> dict:
    from ..library import quantization as quant
    from ..library.saved import locate_adapter, read_adapter_config

    saved = read_adapter_config(locate_adapter(args.adapter))["quantization"]
    if saved is None or saved["method"] == "int8":
        usage_error(args.command, f"--compute-dtype applies to a 4-bit base; {args.adapter} was trained on a "
                                  f"{quant.describe(saved)} base")
    return {**saved, "compute_dtype": args.compute_dtype}


def add_length_options(p: argparse.ArgumentParser) -> None:
    """--max-length and --max-prompt-length of a command that measures an adapter on preference data."""
    p.add_argument("--max-length", type=positive_int,
                   help=f"tokens per row, prompt included (default: as the adapter was trained, else {MAX_LENGTH})")
    p.add_argument("--max-prompt-length", type=positive_int,
                   help="default: as the adapter was trained when --max-length is too, else half of --max-length")


def check_length_options(command: str, args) -> None:
    """--max-length and --max-prompt-length as given, checked before anything is read."""
    from ..library.data import check_lengths

    if args.max_length is None:  # the adapter's, read later (adapter_lengths)
        return
    try:
        check_lengths(args.max_length, args.max_prompt_length)
    except ValueError as exc:
        usage_error(command, str(exc).replace("max_prompt_length", "--max-prompt-length")
                    .replace("max_length", "--max-length"))


def adapter_lengths(command: str, args) -> None:
    """--max-length and --max-prompt-length not given: as the adapter was trained (its provenance
    records its options: held-out pairs cut as its training pairs were), else the default; checked
    before a model loads."""
    from ..library.provenance import read_provenance
    from ..library.saved import locate_adapter

    if args.max_length is None:
        record, _ = read_provenance(locate_adapter(args.adapter))
        trained = ((record or {}).get("training") or {}).get("options") or {}
        args.max_length = trained.get("max_length") or MAX_LENGTH
        if args.max_prompt_length is None:
            args.max_prompt_length = trained.get("max_prompt_length")
        check_length_options(command, args)


def read_option_file(command: str, option: str, read, path: str | None):
    """``read(path)`` (None without a path); a file that cannot be opened is named by its option."""
    if path is None:
        return None
    try:
        return read(path)
    except OSError as exc:
        usage_error(command, f"{option} {path}: {exc.strerror}")
