"""The ``qadapter`` command: demo (the main job), train, generate, serve, eval, plan, compare, lm-eval, info, check.

One module per kind of work, each with its commands' options (``<command>_parser``) and runs
(``<command>_command``): ``train`` (train, plan), ``decode`` (generate, serve), ``measure`` (eval,
info, check), ``experiment`` (demo, compare, lm-eval); ``arguments`` holds what they share (argument
types, the quantization options, the one-line usage error). This module builds the parser and runs
a command: its expected failures are one line on stderr and an exit code.

Exit codes: 0 done; 1 a verdict (``check`` failed its thresholds, ``plan`` does not fit, training
went non-finite, ``lm-eval validate`` lacks a task); 2 bad arguments or inputs, a message naming
them (argparse's convention); 3 an unexpected error (its traceback: a bug to report); 130 / 143
interrupted / terminated; 141 the reader of the output went away. The
options of ``demo``, ``compare`` and ``train`` are generated from their dataclasses (``DemoOptions``,
``CompareOptions``, ``QAdapterConfig``, whose loss options are ``qadapter_kernels.LossConfig``'s fields).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Collection
from contextlib import contextmanager

from . import decode, experiment, measure, train
from .arguments import usage_error

# Each command: its one-line help, the function that adds its description and options, and the one
# that runs it.
COMMANDS = {
    "demo": ("train a Q-Adapter on the built-in task with the embedded default and report",
             experiment.demo_parser, experiment.demo_command),
    "train": ("train a Q-Adapter on preference data", train.train_parser, train.train_command),
    "generate": ("generate with the customized policy (streams tokens)", decode.generate_parser,
                 decode.generate_command),
    "serve": ("an OpenAI-compatible HTTP server of customized policies (many adapters, one base)",
              decode.serve_parser, decode.serve_command),
    "eval": ("preference accuracy, margin, loss and KL to the base on preference data", measure.eval_parser,
             measure.eval_command),
    "plan": ("predict the peak GPU memory of training (no GPU needed)", train.plan_parser, train.plan_command),
    "compare": ("Q-Adapter against SFT and DPO: preference learned vs knowledge kept", experiment.compare_parser,
                experiment.compare_command),
    "lm-eval": ("benchmarks with lm-evaluation-harness, on the model 'qadapter' by default",
                experiment.lm_eval_parser, experiment.lm_eval_command),
    "info": ("what a saved adapter is: its provenance", measure.info_parser, measure.info_command),
    "check": ("measure an adapter against its base; fail it when it forgets", measure.check_parser,
              measure.check_command),
}


def build_parser(commands: Collection[str] = tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The command line, with the options of ``commands`` only: some commands' options come from
    modules that import torch and transformers, which ``qadapter --help`` and ``--version`` need not
    wait for."""
    parser = argparse.ArgumentParser(
        prog="qadapter", description="Q-Adapter: customize a frozen LLM to new preferences without forgetting, "
                                     "with fused no-logits kernels.",
        # The benchmarks are not part of the installed package: they run from a source checkout.
        epilog="Benchmarks: from a source checkout of the repository, run python -m bench.report "
               "(python -m bench.report --help for its options).")
    parser.add_argument("--version", action="version", version=f"qadapter {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (summary, add_options, _) in COMMANDS.items():
        p = sub.add_parser(name, help=summary)
        if name in commands:
            add_options(p)
    return parser


# What the libraries print on every run about their own versions or this machine, none of it about
# the run (logger or warning category, and the message's start): PEFT calling transformers' renamed
# gradient-checkpointing property; bitsandbytes falling back from a hub-fetched CPU kernel to its own;
# DeepSpeed (imported by transformers when installed) saying it found no GPU, on stdout; ZeRO-3's gathers
# and reductions calling torch's renamed collectives.
LIBRARY_CHATTER = (
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("DeepSpeed", "Setting accelerator to CPU"),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from"),  # once per 8-bit layer call
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
    (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated"),
)


@functools.cache  # once a process: the loggers' filters would pile up with every main() call
def _quiet_library_chatter() -> None:
    """Keeps the command's output its own (LIBRARY_CHATTER); a library's errors and every other
    warning still show. The command line only: importing qadapter changes no filters."""
    for source, start in LIBRARY_CHATTER:
        if isinstance(source, type):
            warnings.filterwarnings("ignore", message=re.escape(start), category=source)
        else:
            logging.getLogger(source).addFilter(lambda record, start=start: not record.getMessage().startswith(start))


# The extra of the package that installs each optional module a command imports (top-level names).
EXTRAS = {"transformers": "model", "peft": "model", "accelerate": "model", "datasets": "model", "safetensors": "model",
          "gguf": "model", "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve",
          "bitsandbytes": "quant", "trl": "trl", "lm_eval": "lm-eval", "deepspeed": "deepspeed", "matplotlib": "plot"}


def _missing_module(exc: ModuleNotFoundError) -> str:
    """One line for a module that is not installed: which, and the extra that installs it (or, where
    the package is there without that module, an older release of it: the upgrade). transformers'
    lazy imports wrap an absent package's error in an unnamed one of their own: the absent one is said
    (not under one of the project's own, which says what is missing and how to install it)."""
    import importlib.util

    while exc.name is None and "pip install" not in str(exc) and isinstance(exc.__cause__, ModuleNotFoundError):
        exc = exc.__cause__
    message = str(exc)
    package = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(package)
    if extra is None or "pip install" in message:
        return message
    try:
        installed = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a finder that refuses the name: not importable either way
        installed = False
    if installed:
        return f'{message} (the installed {package} is older than this needs): pip install -U "qadapter-kernels[{extra}]"'
    return f'{message}: pip install "qadapter-kernels[{extra}]"'


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("qadapter-kernels")
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path, not installed
        from qadapter_kernels import __version__
        return __version__


def _stdout_never_fails_on_text() -> None:
    """A character stdout's encoding lacks is written escaped (``\\u30a2``), as stderr writes it, not
    an error that ends the command having printed nothing: Windows writes a redirected stdout in its
    ANSI code page (cp1252), which lacks most of what a path, a data set or a generation may hold."""
    import codecs

    stream = sys.stdout
    try:
        if stream.errors == "strict" and codecs.lookup(stream.encoding).name != "utf-8":
            stream.reconfigure(errors="backslashreplace")
    except (AttributeError, LookupError, TypeError, ValueError):  # not a text stream we can change
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_library_chatter()
    _stdout_never_fails_on_text()
    if not sys.stderr.isatty():  # progress bars on a terminal only (the hub's and transformers', as ours)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # some commands' options come from modules that need the model extra, their --help too
        parser = build_parser(commands=argv[:1])  # the command comes first: the top level has no options but these
    except ModuleNotFoundError as exc:
        usage_error(argv[0], _missing_module(exc))
    except KeyboardInterrupt:  # while the options' modules import: no traceback, the code of an interrupt
        print(" ".join(["qadapter", *argv[:1]]) + ": interrupted", file=sys.stderr)
        return 130
    if not argv:  # a command is needed: what there are, as a bad argument exits
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.training_options = extra  # train's TrainingArguments fields (--name value), parsed by HfArgumentParser
    _check_one_process(args)
    format_warning = warnings.formatwarning  # a warning is one line of the command's own, while it runs
    warnings.formatwarning = lambda message, *_, **__: f"qadapter {args.command}: warning: {message}\n"
    try:
        with _terminated_as_interrupted():
            return _run_command(args)
    finally:
        warnings.formatwarning = format_warning


def _check_one_process(args) -> None:
    """Only train shares its work among a launcher's processes (torchrun, accelerate launch): under
    one, another command would run whole in every process, each printing and writing the same."""
    from ..library.launch import launch_variable, launched_processes

    processes = launched_processes()
    shared = args.command == "train" or (args.command == "lm-eval" and args.model != "qadapter")  # lm-eval's own
    if processes > 1 and not shared:
        usage_error(args.command, f"runs in one process; this is one of {processes} a launcher started "
                                  f"({launch_variable()}): run it without torchrun or accelerate launch (or unset "
                                  f"{launch_variable()})")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or launcher's stop): unwound as a Ctrl-C is, so what is being saved is
    finished or dropped whole (``atomic.save_files``)."""


@contextmanager
def _terminated_as_interrupted():
    """SIGTERM raises :class:`Terminated` inside (in the main thread; the serving command's server
    installs its own handler, which shuts it down gracefully)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends a process stuck in C at once
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def _run_command(args) -> int:
    """The command's run, its expected failures each one line on stderr and an exit code."""
    try:
        return COMMANDS[args.command][2](args)
    except BrokenPipeError:  # the reader stopped reading (`qadapter info DIR | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and nothing for exit's flush to fail on
        return 141  # as a shell reports a command ended by SIGPIPE
    except ModuleNotFoundError as exc:  # an extra not installed: one line, naming it
        usage_error(args.command, _missing_module(exc))
    except (OSError, ValueError) as exc:  # a path, a value: one line
        usage_error(args.command, str(exc))
    except FloatingPointError as exc:  # training went non-finite: it says at which step, and what is kept
        print(f"qadapter {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # what is saved is whole (saving is atomic); no traceback for a Ctrl-C
        terminated = isinstance(exc, Terminated)
        print(f"qadapter {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130  # as a shell reports a command ended by SIGTERM or SIGINT
    except Exception as exc:  # noqa: BLE001 -- a bug: its traceback, and a code no verdict (1) or bad input (2) has
        import traceback

        traceback.print_exc()
        print(f"qadapter {args.command}: unexpected error ({type(exc).__name__}); the traceback above is worth "
              "a report", file=sys.stderr)
        return 3
