"""Preference data -> tokenized chosen/rejected pairs whose labels score only response tokens.

Two row formats are accepted:

- conversational pairs ``{"chosen": [messages], "rejected": [messages]}`` (HH-RLHF, the method's
  DSP data): the prompt is the longest shared prefix of the two conversations, the responses
  are what follows (assistant turns);
- ``{"prompt": ..., "chosen": ..., "rejected": ...}`` where each is a string or a list of
  messages (a string prompt becomes a user turn, a string response an assistant turn).

With a chat template, the prompt is rendered with the generation prompt and each response is
the rest of the rendered conversation; without one (or ``use_chat_template=False``), plain
strings are concatenated. Prompt and response are tokenized separately so that the boundary
between ignored and scored tokens is exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qadapter_kernels import LossConfig

IGNORE_INDEX = LossConfig.ignore_index  # the label of unscored positions: the loss's default ignore_index
ROLES = ("system", "user", "assistant", "tool")


class PreferenceDataError(ValueError):
    """A malformed preference row; the message names the row index and the problem."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"preference row {index}: {problem}")
        self.index, self.problem = index, problem


@dataclass
class PreferencePair:
    """One row, normalized: a prompt and two responses, each a string or a list of messages."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]


@dataclass
class DataSummary:
    """How many rows were read, kept and skipped, and why they were skipped."""

    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def __str__(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common()) or "none"
        return f"{self.kept}/{self.rows} pairs kept ({self.truncated} truncated); skipped: {reasons}"


def _check_messages(index: int, key: str, messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise PreferenceDataError(index, f"'{key}' must be a string or a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PreferenceDataError(index, f"'{key}'[{i}] must be a message {{'role': str, 'content': str}}")
        if m["role"] not in ROLES:
            raise PreferenceDataError(index, f"'{key}'[{i}] has unknown role {m['role']!r}")
    return messages


def _check_response(index: int, key: str, response: str | list[dict]) -> None:
    if isinstance(response, str):
        empty = not response.strip()
    else:
        if any(m["role"] != "assistant" for m in response):
            raise PreferenceDataError(index, f"'{key}' response contains a non-assistant turn")
        empty = not any(m["content"].strip() for m in response)
    if empty:
        raise PreferenceDataError(index, f"'{key}' response is empty")


def normalize_row(index: int, row: Any) -> PreferencePair:
    """Checks one raw row and splits it into prompt, chosen and rejected."""
    if isinstance(row, UnreadableRow):
        raise PreferenceDataError(index, row.problem)
    if not isinstance(row, dict):
        raise PreferenceDataError(index, f"must be a JSON object, got {type(row).__name__}")
    if "prompt" in row and row["prompt"] is None:
        raise PreferenceDataError(index, "'prompt' is null: give the shared prompt (a string or a list of messages), "
                                         "or leave the key out when chosen and rejected are whole conversations")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise PreferenceDataError(index, f"missing key '{key}'")
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PreferenceDataError(index, "no shared prompt: 'prompt' is empty")
        else:
            prompt = _check_messages(index, "prompt", prompt)
            if not prompt:
                raise PreferenceDataError(index, "no shared prompt: 'prompt' is an empty list")
        for key in ("chosen", "rejected"):
            if not isinstance(row[key], str):
                _check_messages(index, key, row[key])
    else:
        chosen = _check_messages(index, "chosen", row["chosen"])
        rejected = _check_messages(index, "rejected", row["rejected"])
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise PreferenceDataError(index, "no shared prompt: the conversations differ from their first message")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if chosen == rejected:
        raise PreferenceDataError(index, "chosen is identical to rejected")
    _check_response(index, "chosen", chosen)
    _check_response(index, "rejected", rejected)
    return PreferencePair(prompt, chosen, rejected)


def _as_messages(content: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": content}] if isinstance(content, str) else content


def _render(tokenizer, pair: PreferencePair, use_chat_template: bool) -> tuple[str, str, str]:
    """Prompt text and the two response texts that follow it."""
    if not use_chat_template:
        if not all(isinstance(x, str) for x in (pair.prompt, pair.chosen, pair.rejected)):
            raise ValueError("rows with messages need a chat template: the tokenizer has none (or use_chat_template=False)")
        return pair.prompt, pair.chosen, pair.rejected
    prompt = _as_messages(pair.prompt, "user")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    responses = []
    for response in (pair.chosen, pair.rejected):
        full = tokenizer.apply_chat_template(prompt + _as_messages(response, "assistant"), tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as its prompt (with the "
                "generation prompt) followed by the response; response tokens cannot be located"
            )
        responses.append(full[len(prompt_text) :])
    return prompt_text, responses[0], responses[1]


def _fit(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int):
    """Truncates the prompt from the left and the responses from the right to fit ``max_length``;
    both sides keep the same prompt and every response keeps at least one scored token."""
    kept_prompt = min(len(prompt), max_prompt_length)
    fitted = [r[: max(1, max_length - kept_prompt)] for r in responses]
    kept_prompt = min(kept_prompt, max_length - max(len(r) for r in fitted))
    return prompt[len(prompt) - kept_prompt :], fitted


def tokenize_pair(
    tokenizer, pair: PreferencePair, *, max_length: int, max_prompt_length: int, use_chat_template: bool
) -> tuple[dict[str, list[int]], bool]:
    """Token ids and labels of both sequences of one pair, and whether anything was truncated."""
    prompt_text, chosen_text, rejected_text = _render(tokenizer, pair, use_chat_template)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not use_chat_template)["input_ids"]
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (chosen_text, rejected_text)]
    if not prompt_ids:
        prompt_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    if any(not r for r in responses):
        raise ValueError("a response tokenizes to no token")
    prompt_fit, fitted = _fit(prompt_ids, responses, max_length, max_prompt_length)
    truncated = len(prompt_fit) < len(prompt_ids) or any(len(f) < len(r) for f, r in zip(fitted, responses))
    out = {}
    for name, response in zip(("chosen", "rejected"), fitted):
        out[f"{name}_input_ids"] = prompt_fit + response
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_fit) + response
    return out, truncated


def tokenize_rows(
    rows: Iterable[Any],
    tokenizer,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
    skip_invalid: bool = False,
    use_chat_template: bool | None = None,
) -> tuple[list[dict[str, list[int]]], DataSummary]:
    """Tokenized pairs from raw rows; malformed rows raise, or are skipped and counted."""
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {value!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt and one response token); got {max_length}")
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1; got {max_prompt_length}")
    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    summary, features = DataSummary(), []
    for index, row in enumerate(rows):
        summary.rows += 1
        try:
            pair = normalize_row(index, row)
            feature, truncated = tokenize_pair(
                tokenizer, pair, max_length=max_length, max_prompt_length=max_prompt_length,
                use_chat_template=use_chat_template,
            )
        except PreferenceDataError as exc:
            if not skip_invalid:
                raise
            summary.skipped[exc.problem] += 1
            continue
        summary.truncated += truncated
        summary.kept += 1
        features.append(feature)
    if not features:
        raise ValueError(f"no usable preference pair: {summary}")
    return features, summary


@dataclass(frozen=True)
class UnreadableRow:
    """A line of a .jsonl file that is not JSON: an invalid row (skipped with ``skip_invalid``)."""

    problem: str


DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        return path.read_bytes().decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is not data
    except UnicodeDecodeError as exc:
        raise ValueError(f"data file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc


def read_rows(source: Any, *, split: str = "train") -> list[Any]:
    """Raw rows from a local .json/.jsonl/.parquet file, a ``datasets.Dataset``, a list, or a hub name.

    A .jsonl line that is not JSON becomes an :class:`UnreadableRow` (an invalid row, named by its
    line); a path with another suffix is refused rather than looked up on the hub.
    """
    import json

    if isinstance(source, list):
        return source
    if hasattr(source, "to_list") and hasattr(source, "column_names"):
        return source.to_list()
    path = Path(str(source))
    if path.is_dir():  # datasets would read every data file under it, however many and whatever they hold
        raise ValueError(f"data {path} is a folder; give a {', '.join(DATA_SUFFIXES)} file or a hub data set name")
    if path.suffix and path.suffix not in DATA_SUFFIXES:
        raise ValueError(f"data file {path}: unsupported format {path.suffix!r}; use {', '.join(DATA_SUFFIXES)} "
                         "files or a hub data set name")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    rows.append(UnreadableRow(f"line {number} of {path} is not valid JSON: {exc}"))
        return rows
    if path.suffix == ".json":
        text = _read_text(path)
        if not text.strip():
            raise ValueError(f"data file {path} is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
        if not isinstance(data, list):
            raise ValueError(f"data file {path} must hold a JSON list of rows; got a {type(data).__name__}")
        return data
    import datasets

    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        return datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
    return datasets.load_dataset(str(source), split=split).to_list()  # a hub data set


def check_rows(source: Any, *, split: str = "train", skip_invalid: bool = False) -> list[Any]:
    """The rows, read once and given the structural checks that need no tokenizer: bad data fails
    in a second, before any model is loaded for it (``skip_invalid``: only the file is checked).
    :func:`load_preference_data` takes the returned list."""
    rows = read_rows(source, split=split)
    if not rows:
        raise ValueError(f"data {source} holds no preference row")
    if not skip_invalid:
        for index, row in enumerate(rows):
            normalize_row(index, row)
    return rows


def load_preference_data(
    source: Any,
    tokenizer,
    *,
    split: str = "train",
    max_length: int = 512,
    max_prompt_length: int = 256,
    skip_invalid: bool = False,
    use_chat_template: bool | None = None,
):
    """A ``datasets.Dataset`` of tokenized pairs, and the :class:`DataSummary` of the reading."""
    import datasets

    features, summary = tokenize_rows(
        read_rows(source, split=split), tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
        skip_invalid=skip_invalid, use_chat_template=use_chat_template,
    )
    return datasets.Dataset.from_list(features), summary


PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


@dataclass
class PreferenceCollator:
    """Stacks pairs as ``[chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}]`` (the loss's layout),
    right-padded to the longest sequence of the batch."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise TypeError(f"pad_token_id must be an int (the tokenizer's pad or eos id); got {self.pad_token_id!r}")
        multiple = self.pad_to_multiple_of
        if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple <= 0):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None; got {multiple!r}")

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PreferenceCollator got no pairs: a batch holds at least one")
        if not all(key in features[0] for key in PAIR_KEYS):
            raise ValueError(f"PreferenceCollator takes tokenized pairs ({', '.join(PAIR_KEYS)}); got a row of "
                             f"{sorted(features[0])}: tokenize raw rows with qadapter.library.data.load_preference_data "
                             "or tokenize_rows")
        sequences = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, (ids, lab) in enumerate(zip(sequences, labels)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            label_ids[row, : len(lab)] = torch.tensor(lab)
            attention[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}
