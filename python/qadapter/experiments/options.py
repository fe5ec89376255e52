"""The options of ``qadapter demo`` and ``qadapter compare``, apart from the experiments themselves: the
commands' parsers are generated from these dataclasses, and building them (``--help`` included) must
not import what the experiments run on (transformers, PEFT, TRL)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qadapter_kernels import LossConfig
from qadapter_kernels.registry import BACKEND_NAMES

from ..library.data import check_lengths
from ..library.defaults import DEFAULT_MODEL
from .task import PROMPT_LENGTH


def option_field(default, help: str, **metadata):
    """A dataclass field whose metadata drives its command-line option (see ``cli.add_dataclass_options``)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class DemoOptions:
    """The demo's options; ``qadapter demo``'s command line is generated from these fields (their
    metadata: ``help``, ``choices``, ``positive``, and ``flag`` where it is not ``--field-name``)."""

    model: str = option_field(DEFAULT_MODEL, "base model: a local directory, a hub name, or the embedded default "
                              "(whose own answers the built-in task's pairs were made from)")
    output: str = option_field("qadapter-demo", "directory for the adapter and report.json")
    max_steps: int = option_field(40, "training steps", positive=True, flag="--steps")
    pairs_per_step: int = option_field(4, "preference pairs per training step", positive=True)
    learning_rate: float = option_field(2e-3, "peak learning rate (cosine schedule)", positive=True)
    max_length: int = option_field(80, "tokens per sequence, prompt included", positive=True)
    max_prompt_length: int = option_field(PROMPT_LENGTH, "prompt tokens kept (cut from the left)", positive=True)
    answer_tokens: int = option_field(40, "tokens generated per evaluation answer", positive=True)
    seed: int = option_field(0, "seed of the adapter's initialization and of training")
    backend: str = option_field("auto", "qadapter_kernels backend (loss and decoding)", choices=BACKEND_NAMES)
    probe_limit: int | None = option_field(None, "use only the first N probe questions", positive=True)
    heldout_limit: int | None = option_field(None, "use only the first N held-out pairs", positive=True)
    quantization: str | dict | None = option_field(None, "the base quantized by bitsandbytes ('4bit', '8bit', a dict; "
                                                   "qadapter.library.quantization)", cli=False)



METHODS = ("sft", "dpo", "qadapter")
DEFAULT_BUDGETS = "40"
DEFAULT_HELDOUT = 400


@dataclass
class CompareOptions:
    """The comparison's options; ``qadapter compare``'s command line is generated from these fields."""

    model: str = option_field(DEFAULT_MODEL, "base model of every method: a local directory, a hub name, or the "
                              "embedded default")
    output: str = option_field("qadapter-compare", "directory for compare.json, compare.md and compare.png")
    budgets: str | None = option_field(None, "training steps per method, comma-separated: one run of every method "
                                       f"per budget (40,160 draws the trade-off as a curve; default: {DEFAULT_BUDGETS})")
    pairs_per_step: int = option_field(4, "preference pairs per training step", positive=True)
    learning_rate: float = option_field(2e-3, "peak learning rate of every method (cosine schedule)", positive=True)
    dpo_learning_rate: float | None = option_field(None, "DPO's own learning rate (default: --learning-rate)",
                                                   positive=True)
    methods: str = option_field(",".join(METHODS), "methods to train, comma-separated, from " + ",".join(METHODS))
    dpo_beta: float = option_field(0.1, "DPO's beta", positive=True)
    alpha_0: float = option_field(LossConfig.alpha_0, "the Q-Adapter's weight on the frozen model's log-probs",
                                  non_negative=True)
    alpha_tilde: float = option_field(LossConfig.alpha_tilde, "the Q-Adapter's temperature; alpha~ = 1 + alpha_0 "
                                      "makes the untrained adapter's policy the base's own", positive=True)
    lora_r: int = option_field(8, "LoRA rank of every method", positive=True)
    data: str | None = option_field(None, "preference data file (JSON/JSONL); default: the built-in TL;DR task")
    heldout: int | None = option_field(None, f"with --data: the last N pairs are held out (default: {DEFAULT_HELDOUT})",
                                       positive=True)
    skip_invalid: bool = option_field(False, "skip malformed rows of --data (counted in the report) instead of failing")
    max_length: int = option_field(80, "tokens per sequence, prompt included", positive=True)
    max_prompt_length: int | None = option_field(
        None, f"prompt tokens kept (cut from the left); default: {PROMPT_LENGTH} on the built-in task (where "
        "--max-length is above it), else half of --max-length", positive=True)
    answer_tokens: int = option_field(40, "tokens generated per answer (held-out prompts, probe, general prompts)",
                                 positive=True)
    seed: int = option_field(0, "seed of every adapter's initialization and training")
    quick: bool = option_field(False, "a smoke test: 2 steps (not with --budgets), a few pairs, questions and prompts")
    quantization: str | dict | None = option_field(None, "every method's base quantized by bitsandbytes ('4bit', "
                                                   "'8bit', a dict; qadapter.library.quantization)", cli=False)

    def method_list(self) -> list[str]:
        chosen = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not chosen or any(m not in METHODS for m in chosen):
            raise ValueError(f"methods must be a comma-separated subset of {','.join(METHODS)}; got {self.methods!r}")
        return chosen

    def method_learning_rate(self, method: str) -> float:
        return self.dpo_learning_rate if method == "dpo" and self.dpo_learning_rate else self.learning_rate

    def check(self) -> None:
        """Options that contradict each other, or would fail only after a method trained."""
        self.budget_steps()
        self.method_list()
        if self.quick and self.budgets is not None:
            raise ValueError("--quick runs 2 steps; it does not take --budgets")
        if self.heldout is not None and self.data is None:
            raise ValueError("--heldout applies with --data (the built-in task has its own held-out pairs)")
        if self.skip_invalid and self.data is None:
            raise ValueError("--skip-invalid applies with --data (the built-in task has no malformed rows)")
        LossConfig(alpha_0=self.alpha_0, alpha_tilde=self.alpha_tilde)
        check_lengths(self.max_length, self.prompt_length())

    def prompt_length(self) -> int:
        """``max_prompt_length``, or its default: the built-in task's, or half of ``max_length``."""
        if self.max_prompt_length is not None:
            return self.max_prompt_length
        if self.data is None and self.max_length > PROMPT_LENGTH:
            return PROMPT_LENGTH
        return self.max_length // 2

    def budget_steps(self) -> list[int]:
        if self.quick:
            return [2]
        try:
            steps = [int(s) for s in (DEFAULT_BUDGETS if self.budgets is None else self.budgets).split(",")]
        except ValueError:
            steps = []
        if not steps or min(steps) <= 0:
            raise ValueError(f"budgets must be positive step counts separated by commas; got {self.budgets!r}")
        return steps

