"""Preference data -> tokenized chosen/rejected pairs whose labels score only response tokens.

Two row formats are accepted, TRL's preference formats:

- implicit prompt ``{"chosen": ..., "rejected": ...}``, both whole conversations (lists of
  messages: HH-RLHF, the method's DSP data) or both strings (raw HH-RLHF text): the prompt is
  their longest shared prefix (of messages, or of characters as TRL's ``extract_prompt`` splits
  it), the responses what follows;
- ``{"prompt": ..., "chosen": ..., "rejected": ...}`` where each is a string or a list of
  messages (a string prompt becomes a user turn, a string response an assistant turn).

A ``prompt`` of null is an implicit prompt (a column store cannot leave the key out of one row), and
so is a string prompt beside responses that are whole conversations (UltraFeedback's binarized
layout, as TRL's ``maybe_extract_prompt`` takes it); a list of messages stored as a JSON string is
the list; a ``tools`` column is passed to the chat template, as TRL does, and so is a
``chat_template_kwargs`` column (an object, or one stored as a JSON string: the template's options for
that row, such as Qwen3's ``enable_thinking``) over the options every row gets
(``chat_template_kwargs=``, an adapter's recorded ones).

With a chat template, the prompt is rendered with the generation prompt and each response is
the rest of the rendered conversation. Without a template (or ``use_chat_template=False``), and
where a row's prompt was rendered with the template beforehand (it holds the template's markup, or
begins as the template begins a user's turn: it is not rendered twice), text is taken as it is, each response given the tokenizer's EOS token at its end
as TRL gives it. Prompt and response are tokenized separately so that the boundary between
ignored and scored tokens is exact.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qadapter_kernels import LossConfig
from qadapter_kernels.config import check_integer

from .defaults import MAX_LENGTH

IGNORE_INDEX = LossConfig.ignore_index  # the label of unscored positions: the loss's default ignore_index
ROLES = ("system", "user", "assistant", "tool")
logger = logging.getLogger(__name__)


class PreferenceDataError(ValueError):
    """A malformed preference row; the message names the row index (and its line in a .jsonl file)
    and the problem."""

    def __init__(self, index: int, problem: str, line: str | None = None, reason: str | None = None) -> None:
        super().__init__(f"preference row {index}{f' ({line})' if line else ''}: {problem}")
        self.index, self.problem, self.line = index, problem, line
        self.reason = reason or problem  # what skipped rows are counted by (no row's own position in it)

    def __reduce__(self):
        """Rebuilt from its own arguments (an exception pickles its message alone, which this one's
        constructor does not take): raised in a worker process, it reaches the caller as itself."""
        return type(self), (self.index, self.problem, self.line, self.reason)


class _PairProblem(ValueError):
    """What makes a well-formed row unusable once rendered and tokenized; becomes the row's
    :class:`PreferenceDataError`."""


class Rows(list):
    """Raw rows read from a .jsonl file, each with the line it was read from (blank lines are not
    rows): an error names both."""

    def __init__(self, rows: Iterable[Any], lines: list[str]) -> None:
        super().__init__(rows)
        self.lines = lines

    def __getitem__(self, index):
        if isinstance(index, slice):  # a part of the file (held-out rows): still named by their lines
            return Rows(super().__getitem__(index), self.lines[index])
        return super().__getitem__(index)


def _line(rows: Any, index: int) -> str | None:
    lines = getattr(rows, "lines", None)
    return lines[index] if lines is not None and index < len(lines) else None


@dataclass
class PreferencePair:
    """One row, normalized: a prompt and two responses, each a string or a list of messages."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    tools: list[dict] | None = None
    template_options: dict | None = None  # the row's own chat_template_kwargs


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


def message_text(content: str | list, field: str) -> str:
    """A message's content as text: a string, or OpenAI's list of content parts, of which only text
    parts are taken (their texts joined by newlines, as vLLM joins them for a text model); an image
    or audio part is refused by its type (ValueError), never dropped."""
    if isinstance(content, str):
        return content
    if not content:
        raise ValueError(f"{field} must be a string or a non-empty list of text parts; got []")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise ValueError(f"{field}[{j}] is a part of type {kind!r}: text parts only")
        if kind != "text" or not isinstance(part.get("text"), str) or any(
                v is not None for k, v in part.items() if k not in ("type", "text")):
            raise ValueError(f'{field}[{j}] must be a text part, {{"type": "text", "text": a string}}; got '
                             f"{json.dumps(part)[:80]}")
    return "\n".join(part["text"] for part in content)


def _check_messages(index: int, key: str, messages: Any) -> list[dict]:
    """The messages, each content as text (:func:`message_text`; an assistant's tool call has none)."""
    if not isinstance(messages, list):
        raise PreferenceDataError(index, f"'{key}' must be a string or a list of messages, got {type(messages).__name__}")
    checked = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if content is None and isinstance(m, dict) and m.get("tool_calls"):
            content = ""  # OpenAI's assistant message that only calls tools
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, (str, list)):
            raise PreferenceDataError(index, f"'{key}'[{i}] must be a message {{'role': str, 'content': str}}",
                                      reason=f"'{key}' holds something that is not a message {{'role', 'content'}}")
        if m["role"] not in ROLES:
            raise PreferenceDataError(index, f"'{key}'[{i}] has unknown role {m['role']!r}",
                                      reason=f"'{key}' has a message of an unknown role (not one of {', '.join(ROLES)})")
        try:
            checked.append({**m, "content": message_text(content, f"'{key}'[{i}].content")})
        except ValueError as exc:
            raise PreferenceDataError(index, str(exc), reason=f"'{key}' has a message whose content is not text") from None
    return checked


def _says_something(message: dict) -> bool:
    return bool(message["content"].strip() or message.get("tool_calls"))


def _shared_text(chosen: str, rejected: str) -> int:
    """Where two whole-text conversations part: their common prefix, less a space that would end
    it (the space then starts each response), as TRL's ``extract_prompt`` splits them; a prefix that
    ends inside a word (``Sure`` of ``Surely`` and ``Sure,``) ends before that word instead, so that
    no word is cut into a prompt's part and a response's: before the whitespace that precedes it (which
    starts each response), or after the punctuation that does (``Assistant:Sure``, ``助手：我``);
    where nothing precedes it, the prefix stays whole."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared and chosen[shared - 1].isalnum() and any(text[shared:shared + 1].isalnum() for text in (chosen, rejected)):
        start = next((i for i in range(shared - 1, -1, -1) if not chosen[i].isalnum()), None)
        if start is not None:
            return start if chosen[start].isspace() else start + 1
    return shared - 1 if shared and chosen[shared - 1] == " " else shared


def _tools(index: int, row: dict) -> list[dict] | None:
    tools = row.get("tools")
    if isinstance(tools, str):  # a JSON string, as TRL's data sets store it in a column
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise PreferenceDataError(index, f"'tools' is a string that is not JSON: {exc}") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise PreferenceDataError(index, "'tools' must be a list of tool definitions (objects)")
    _check_unicode_text(index, "tools", tools)
    return tools or None


def _template_options(index: int, row: dict) -> dict | None:
    try:  # a JSON string, as a column store may hold an object of varying keys
        options = parse_template_options(row.get("chat_template_kwargs"), "'chat_template_kwargs'")
    except ValueError as exc:
        raise PreferenceDataError(index, str(exc)) from None
    # A column store's struct holds every key some row has, the others null: no option of this row.
    return {key: value for key, value in options.items() if value is not None} or None


def check_template_options(options: Any, name: str = "chat_template_kwargs") -> dict:
    """Options for the chat template (keyword arguments of ``apply_chat_template`` that reach the
    template, such as Qwen3's ``enable_thinking``): an object of named JSON values, or None (none).
    The arguments the rendering sets itself cannot be among them."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ValueError(f"{name} must be an object of named options; got {json.dumps(options, default=repr)[:80]}")
    options = dict(options)
    taken = sorted(set(options) & RENDERING_ARGUMENTS)
    if taken:
        raise ValueError(f"{name} cannot set {', '.join(taken)}: the rendering sets it")
    try:
        json.dumps(options, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must hold JSON values (an adapter records its options as JSON): {exc}") from None
    return options


def parse_template_options(value: Any, name: str = "chat_template_kwargs") -> dict:
    """:func:`check_template_options` of ``value``, an object given as JSON text (a command line's, a
    column store's) read first."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} must be a JSON object; got {value[:80]!r} ({exc})") from None
    return check_template_options(value, name)


# apply_chat_template's own arguments, and what it hands the template under its own names (the
# messages): set by whoever renders, never a template option (the rendering would fail on each).
RENDERING_ARGUMENTS = frozenset({"conversation", "conversations", "messages", "tools", "documents", "chat_template",
                                 "add_generation_prompt", "continue_final_message", "tokenize", "sanitize_control_tokens",
                                 "padding", "truncation", "max_length", "return_tensors", "return_dict",
                                 "return_assistant_tokens_mask", "tokenizer_kwargs"})


def _check_response(index: int, key: str, response: str | list[dict]) -> None:
    if isinstance(response, str):
        empty = not response.strip()
    else:
        if any(m["role"] != "assistant" for m in response):
            raise PreferenceDataError(index, f"'{key}' response contains a non-assistant turn")
        empty = not any(map(_says_something, response))
    if empty:
        raise PreferenceDataError(index, f"'{key}' response is empty")


def normalize_row(index: int, row: Any) -> PreferencePair:
    """Checks one raw row and splits it into prompt, chosen and rejected."""
    if isinstance(row, UnreadableRow):
        raise PreferenceDataError(index, row.problem, reason=row.reason)
    if not isinstance(row, dict):
        raise PreferenceDataError(index, f"must be a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise PreferenceDataError(index, f"missing key '{key}'")
    row = {**row, **{key: _messages_in_json(row[key]) for key in ("prompt", "chosen", "rejected") if key in row}}
    for key in ("prompt", "chosen", "rejected"):  # messages stored as JSON text: decoded first
        _check_unicode_text(index, key, row.get(key))
    if _whole_conversations_beside_a_text_prompt(row):
        row = {**row, "prompt": None}  # the prompt is the conversations' shared turns, as TRL takes it
    if row.get("prompt") is not None:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PreferenceDataError(index, "no shared prompt: 'prompt' is empty")
        else:
            prompt = _check_messages(index, "prompt", prompt)
            if not prompt:
                raise PreferenceDataError(index, "no shared prompt: 'prompt' is an empty list")
            if not any(map(_says_something, prompt)):
                raise PreferenceDataError(index, "no shared prompt: every message of 'prompt' is empty")
        chosen, rejected = (r if isinstance(r, str) else _check_messages(index, key, r)
                            for key, r in (("chosen", chosen), ("rejected", rejected)))
    elif isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        if row["chosen"] == row["rejected"]:
            raise PreferenceDataError(index, "chosen is identical to rejected")
        shared = _shared_text(row["chosen"], row["rejected"])
        if not row["chosen"][:shared].strip():
            raise PreferenceDataError(index, "no shared prompt: the texts of 'chosen' and 'rejected' differ from "
                                             "their start (give the prompt in a 'prompt' column)")
        prompt, chosen, rejected = row["chosen"][:shared], row["chosen"][shared:], row["rejected"][shared:]
    else:
        if any(isinstance(row[key], str) for key in ("chosen", "rejected")):  # not both: say which is which
            raise PreferenceDataError(index, f"without a prompt, 'chosen' and 'rejected' must both be texts or both "
                                             f"lists of messages; got {type(row['chosen']).__name__} and "
                                             f"{type(row['rejected']).__name__}",
                                      reason="without a prompt, 'chosen' and 'rejected' must both be texts or both "
                                             "lists of messages")
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
    return PreferencePair(prompt, chosen, rejected, _tools(index, row), _template_options(index, row))


def _check_unicode_text(index: int, key: str, value: Any) -> None:
    """Refuses a ``value`` that holds a lone surrogate (JSON's ``\\ud800`` escape outside a pair), which no
    tokenizer encodes (it fails on the whole batch, naming no row)."""
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise PreferenceDataError(index, f"'{key}' holds a lone surrogate (a \\ud800-\\udfff escape not in a pair): "
                                         "it is no text a tokenizer can encode",
                                  reason=f"'{key}' holds a lone surrogate") from None


def _messages_in_json(value: Any) -> Any:
    """A list of messages stored as a JSON string (a table exported with its message columns as
    text), as the list; any other value as it is."""
    if not (isinstance(value, str) and value.lstrip().startswith("[{") and value.rstrip().endswith("}]")):
        return value
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return value
    is_messages = isinstance(decoded, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                    for m in decoded)
    return decoded if is_messages else value


def _whole_conversations_beside_a_text_prompt(row: dict) -> bool:
    """A text prompt beside responses that are whole conversations, the prompt's turn included
    (UltraFeedback's binarized layout): TRL's ``maybe_extract_prompt`` takes the conversations'
    shared turns as the prompt then, and so does this."""
    responses = (row["chosen"], row["rejected"])
    return (isinstance(row.get("prompt"), str) and all(isinstance(r, list) for r in responses)
            and any(isinstance(m, dict) and m.get("role") != "assistant" for r in responses for m in r))


def _as_messages(content: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": content}] if isinstance(content, str) else content


def rendered_beforehand(tokenizer) -> Callable[[str], bool]:
    """Whether a string prompt was rendered with the chat template already (TRL's standard format):
    it holds a special token the template writes (named in its source, or its ``bos_token`` and
    ``eos_token``: ChatML's ``<|im_start|>``), or it begins as the template begins a user's turn in
    plain text (Llama-2's and Mistral's ``[INST]``, Zephyr's ``<|user|>``, after any BOS)."""
    template = tokenizer.chat_template
    source = template if isinstance(template, str) else " ".join(map(str, dict(template or {}).values()))
    special = set(getattr(tokenizer, "all_special_tokens", []))
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    named = {getattr(tokenizer, f"{role}_token", None) for role in ("bos", "eos") if f"{role}_token" in source}
    markup = tuple(sorted(mark for mark in special if mark and (mark in source or mark in named)))
    bos = getattr(tokenizer, "bos_token", None) or ""
    sentinel = "\x00question\x00"
    try:
        turn = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    except Exception:  # noqa: BLE001 -- a template that refuses this conversation: its markup alone
        turn = ""
    opening = turn.split(sentinel)[0].removeprefix(bos).strip() if sentinel in turn else ""

    def rendered(prompt: str) -> bool:
        return any(mark in prompt for mark in markup) or bool(opening) and (
            prompt.lstrip().removeprefix(bos).lstrip().startswith(opening))

    return rendered


def _template_starts_with_bos(tokenizer) -> bool:
    """Whether the chat template writes the BOS text first (Llama-3's, Gemma's; not SmolLM2's, Zephyr's)."""
    bos = getattr(tokenizer, "bos_token", None)
    try:
        return bool(bos) and tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False,
                                                           add_generation_prompt=True).startswith(bos)
    except Exception:  # noqa: BLE001 -- a template that refuses this conversation: its rows are refused by name
        return False


@functools.cache
def _warn_generation_prompt(dropped: str) -> None:
    logger.warning(
        "the chat template renders the prompt's generation prompt differently from the start of a "
        "rendered answer: %r is left out of the prompt, which ends where the two agree (as TRL does); "
        "the model is trained on a context a little different from the one it is prompted with", dropped)


def _render(tokenizer, pair: PreferencePair, use_chat_template: bool,
            rendered_before: Callable[[str], bool] | None, template_options: dict) -> tuple[str, str, str, bool]:
    """Prompt text, the two response texts that follow it, and whether the prompt was rendered with
    the chat template beforehand (taken as given; ``rendered_before`` tells, :func:`rendered_beforehand`).
    The template gets ``template_options``, a row's own over them."""
    template_options = {**template_options, **(pair.template_options or {})}
    strings = all(isinstance(x, str) for x in (pair.prompt, pair.chosen, pair.rejected))
    rendered = isinstance(pair.prompt, str) and rendered_before is not None and rendered_before(pair.prompt)
    if rendered and not strings:
        raise _PairProblem("'prompt' was rendered with the chat template already (it holds its markup), but a "
                           "response is a list of messages; give the responses as text too")
    if not use_chat_template or rendered:
        if not strings:
            raise _PairProblem("rows with messages need a chat template: the tokenizer has none (or "
                               "use_chat_template=False)")
        eos = getattr(tokenizer, "eos_token", None)
        responses = [r if not eos or r.rstrip().endswith(eos) else r + eos for r in (pair.chosen, pair.rejected)]
        return pair.prompt, responses[0], responses[1], rendered
    prompt = _as_messages(pair.prompt, "user")

    def render(messages: list[dict], **options) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tools=pair.tools, tokenize=False, **template_options,
                                                 **options)
        except Exception as exc:  # a template's own refusal (Jinja's raise_exception): this row's, named
            raise _PairProblem(f"the chat template fails on this row: {exc}") from None

    for _ in range(2):  # once more where a template writes today's date (Llama-3.1's) and the day turned meanwhile
        prompt_text = render(prompt, add_generation_prompt=True)
        fulls = [render(prompt + _as_messages(response, "assistant")) for response in (pair.chosen, pair.rejected)]
        if all(full.startswith(prompt_text) for full in fulls):
            return prompt_text, fulls[0][len(prompt_text):], fulls[1][len(prompt_text):], False
        history = render(prompt)  # the template's generation prompt differs from how it starts an answer
        follows = all(full.startswith(history) for full in fulls)
        shared = min(next((i for i, (a, b) in enumerate(zip(prompt_text, full)) if a != b),
                          min(len(prompt_text), len(full))) for full in fulls)
        if follows and shared >= len(history):  # what differs is the generation prompt alone (DeepSeek-R1's)
            break
    if not follows:
        raise _PairProblem("the tokenizer's chat template does not render a conversation as its prompt followed by "
                           "the response (it writes an earlier turn by where the conversation ends, as Mistral's "
                           "puts a system message into the last user turn?); response tokens cannot be located")
    if shared < len(history):  # else the prompt's own turns would be scored as the response
        raise _PairProblem("the chat template renders the prompt's turns differently before a generation prompt and "
                           "before an answer (a date or other value it writes, changing between renderings?); "
                           "response tokens cannot be located")
    if shared < len(prompt_text):
        _warn_generation_prompt(prompt_text[shared:])
    return prompt_text[:shared], fulls[0][shared:], fulls[1][shared:], False


def text_start_token(tokenizer) -> int | None:
    """The BOS a tokenizer starts every text it encodes with (Llama's, Gemma's), or None (where its
    BOS is a chat template's turn marker, SmolLM2's, or it has none)."""
    starts = tokenizer(["a"])["input_ids"][0][:1]
    return starts[0] if starts == [tokenizer.bos_token_id] else None


# What a continuation is tokenized after where the tokenizer marks a text's start as a word's start: a
# byte token (SentencePiece's) or a newline's (byte-level BPE's) that no letter after it merges into.
_CONTINUATION_ANCHOR = "\n"


def tokenize_continuations(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` that each continue a text tokenized before them (a response after its
    prompt). A SentencePiece tokenizer (Llama-2's, Mistral's), or a byte-level one that adds a prefix
    space, marks the start of any text it tokenizes as a word's start (``▁``, ``Ġ``: a space): a
    continuation tokenized alone would begin with a space its rendered conversation does not have. There each is tokenized after an anchor whose ids are then
    dropped; a text the anchor merges into (where its ids do not come first) is tokenized alone."""
    if not texts:
        return []  # a tokenizer refuses an empty batch
    alone = tokenizer(texts, add_special_tokens=False)["input_ids"]
    first = tokenizer.convert_ids_to_tokens(tokenizer(["a"], add_special_tokens=False)["input_ids"][0][:1])
    if not (first and isinstance(first[0], str) and first[0].startswith(("\u2581", "\u0120"))):  # ▁, or Ġ: a space
        return alone
    anchor = tokenizer([_CONTINUATION_ANCHOR], add_special_tokens=False)["input_ids"][0]
    after = tokenizer([_CONTINUATION_ANCHOR + text for text in texts], add_special_tokens=False)["input_ids"]
    return [ids[len(anchor):] if ids[:len(anchor)] == anchor else own for ids, own in zip(after, alone)]


def _fit(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
         bos: int | None = None):
    """Truncates the prompt from the left and the responses from the right to fit ``max_length``;
    both sides keep the same prompt and every response keeps at least one scored token. A prompt that
    starts with the ``bos`` token keeps it (a model trained with one sees no sequence without it)."""
    kept_prompt = min(len(prompt), max_prompt_length)
    fitted = [r[: max(1, max_length - kept_prompt)] for r in responses]
    kept_prompt = min(kept_prompt, max_length - max(len(r) for r in fitted))
    if kept_prompt < len(prompt) and kept_prompt > 1 and bos is not None and prompt[0] == bos:
        return prompt[:1] + prompt[len(prompt) - kept_prompt + 1 :], fitted
    return prompt[len(prompt) - kept_prompt :], fitted


def _pair_features(prompt_ids: list[int], responses: list[list[int]], fallback_prompt: int, *, max_length: int,
                   max_prompt_length: int, bos: int | None = None) -> tuple[dict[str, list[int]], bool]:
    """Token ids and labels of both sequences of one tokenized pair, and whether anything was truncated."""
    if not prompt_ids:
        prompt_ids = [fallback_prompt]
    if any(not r for r in responses):
        raise _PairProblem("a response tokenizes to no token")
    prompt_fit, fitted = _fit(prompt_ids, responses, max_length, max_prompt_length, bos)
    truncated = len(prompt_fit) < len(prompt_ids) or any(len(f) < len(r) for f, r in zip(fitted, responses))
    if fitted[0] == fitted[1]:
        raise _PairProblem(f"chosen and rejected are the same tokens within max_length {max_length}: they differ "
                           "only past it (raise max_length)" if truncated else
                           "chosen and rejected are the same tokens")
    out = {}
    for name, response in zip(("chosen", "rejected"), fitted):
        out[f"{name}_input_ids"] = prompt_fit + response
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_fit) + response
    return out, truncated


TOKENIZE_BATCH = 512  # rows rendered, then tokenized in one call each for prompts and responses


def tokenize_rows(
    rows: Iterable[Any],
    tokenizer,
    *,
    max_length: int = MAX_LENGTH,
    max_prompt_length: int | None = None,
    skip_invalid: bool = False,
    use_chat_template: bool | None = None,
    chat_template_kwargs: dict | None = None,
) -> tuple[list[dict[str, list[int]]], DataSummary]:
    """Tokenized pairs from raw rows; malformed rows raise (the first one, in order), or are skipped
    and counted. ``max_prompt_length`` defaults to half of ``max_length``; ``chat_template_kwargs``
    are the chat template's options (:func:`check_template_options`), a row's own column over them.

    Rows are rendered one by one, then tokenized :data:`TOKENIZE_BATCH` at a time: a fast tokenizer
    encodes a batch in one call (in parallel), the same ids as one text at a time. Prompts carry the
    tokenizer's special tokens only without a chat template (a template writes its own)."""
    max_prompt_length = check_lengths(max_length, max_prompt_length)
    check_switch("skip_invalid", skip_invalid)
    check_switch("use_chat_template", use_chat_template, none=True)
    template_options = check_template_options(chat_template_kwargs)
    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if template_options and not use_chat_template:
        logger.warning("chat_template_kwargs %s change nothing: the rows are not rendered with a chat template "
                       "(the tokenizer has none, or use_chat_template=False)", json.dumps(template_options))
    rendered_before = rendered_beforehand(tokenizer) if use_chat_template else None
    fallback_prompt = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sequence_start = text_start_token(tokenizer)  # kept by a prompt cut from the left
    template_bos = use_chat_template and _template_starts_with_bos(tokenizer)
    summary, features = DataSummary(), []

    def take(batch: list[tuple[int, Any]]) -> None:
        """Every row of ``batch`` rendered, the rendered ones tokenized in two calls, then each row's
        outcome taken in order (so the first bad row is the one refused)."""
        rendered: list[tuple[str, str, str, bool] | Exception] = []
        for index, row in batch:
            try:
                rendered.append(_render(tokenizer, normalize_row(index, row), use_chat_template, rendered_before,
                                        template_options))
            except (PreferenceDataError, _PairProblem) as exc:
                rendered.append(exc)
        texts = [r for r in rendered if not isinstance(r, Exception)] or [("", "", "", False)]
        prompts = iter(tokenizer([t[0] for t in texts], add_special_tokens=not use_chat_template)["input_ids"])
        # A prompt rendered beforehand without the BOS text the template starts with gets it, as the same
        # conversation in messages has it.
        prompts = iter([tokenizer.bos_token_id, *ids] if as_given and template_bos and ids[:1] != [tokenizer.bos_token_id]
                       else ids for ids, (*_, as_given) in zip(prompts, texts))
        responses = iter(tokenize_continuations(tokenizer, [r for t in texts for r in t[1:3]]))
        for (index, _), outcome in zip(batch, rendered):
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                feature, truncated = _pair_features(next(prompts), [next(responses), next(responses)], fallback_prompt,
                                                    max_length=max_length, max_prompt_length=max_prompt_length,
                                                    bos=sequence_start)
            except (PreferenceDataError, _PairProblem) as exc:
                if not skip_invalid:
                    problem = exc.problem if isinstance(exc, PreferenceDataError) else str(exc)
                    raise PreferenceDataError(index, problem, _line(rows, index)) from None
                summary.skipped[exc.reason if isinstance(exc, PreferenceDataError) else str(exc)] += 1
                continue
            summary.truncated += truncated
            summary.kept += 1
            features.append(feature)

    batch: list[tuple[int, Any]] = []
    for index, row in enumerate(rows):
        summary.rows += 1
        batch.append((index, row))
        if len(batch) == TOKENIZE_BATCH:
            take(batch)
            batch = []
    if batch:
        take(batch)
    if not features:
        raise ValueError(f"no usable preference pair: {summary}")
    return features, summary


def check_switch(name: str, value: Any, *, none: bool = False) -> None:
    """A flag must be a bool (or None where that means "decide"): the string "no" is true, and would
    skip rows or render a template silently."""
    if not isinstance(value, bool) and not (none and value is None):
        raise TypeError(f"{name} must be True or False{' (or None)' if none else ''}; got {value!r}")


def check_lengths(max_length: int, max_prompt_length: int | None) -> int:
    """``max_prompt_length`` checked against ``max_length`` (half of it when None): a prompt budget
    of the whole length would leave each response one token."""
    max_length = check_integer("max_length", max_length, least=2, note=" (one prompt and one response token)")
    max_prompt_length = (max_length // 2 if max_prompt_length is None
                         else check_integer("max_prompt_length", max_prompt_length, least=1))
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}): the "
                         "responses need room")
    return max_prompt_length


@dataclass(frozen=True)
class UnreadableRow:
    """A line of a .jsonl file that is not JSON: an invalid row (skipped with ``skip_invalid``)."""

    problem: str
    reason: str  # the problem without where in the line it is


JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
READ_SUFFIXES = (".json", *JSON_LINES_SUFFIXES, ".parquet")
# Files of other formats: refused, never looked up on the hub (where a dotted data set name,
# jondurbin/truthy-dpo-v0.1, has a suffix of its own).
FILE_SUFFIXES = (".csv", ".tsv", ".txt", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".arrow", ".feather",
                 ".xlsx", ".xls", ".pkl", ".pickle", ".h5", ".hdf5", ".orc", ".avro", ".yaml", ".yml", ".npy",
                 ".npz", ".pt", ".db", ".sqlite", ".md", ".html", ".xml")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        return path.read_bytes().decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is not data
    except UnicodeDecodeError as exc:
        raise ValueError(f"data file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc


def read_rows(source: Any, *, split: str = "train") -> list[Any]:
    """Raw rows from a local .json/.jsonl/.ndjson/.parquet file (any case), a ``datasets.Dataset`` (or
    a ``DatasetDict``'s ``split``), a list or other iterable of rows, or a hub name.

    A JSON Lines file's rows are :class:`Rows`, which know their lines; a line that is not JSON
    becomes an :class:`UnreadableRow` (an invalid row). A .json file may hold JSON Lines, as
    ``datasets.Dataset.to_json`` writes by default. A file of another format is refused rather than
    looked up on the hub; a name that is no file here and ends in what is no file format
    (``allenai/tulu-2.5-preference-data``) is a hub name.
    """
    if isinstance(source, list):
        return source
    if hasattr(source, "to_list") and hasattr(source, "column_names"):
        return source.to_list()
    if isinstance(source, Mapping):  # a DatasetDict (load_dataset without split=) reads its split
        if source and all(hasattr(part, "column_names") for part in source.values()):
            if split not in source:
                raise ValueError(f"data has no split {split!r}; its splits: {', '.join(map(repr, source))}")
            return read_rows(source[split])
        raise TypeError("data must be a list of rows (one row, a dict, in a list), a datasets.Dataset, a file or a "
                        "hub data set name; got a dict")
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray)):
            return list(source)  # a tuple, a generator: else its repr would be taken for a file or hub name
        raise TypeError(f"data must be a list of rows, a datasets.Dataset, a file or a hub data set name; got "
                        f"{type(source).__name__}")
    path = Path(str(source))
    if path.is_dir():  # datasets would read every data file under it, however many and whatever they hold
        raise ValueError(f"data {path} is a folder; give a {', '.join(READ_SUFFIXES)} file or a hub data set name")
    suffix = path.suffix.lower()
    if suffix not in READ_SUFFIXES and (path.is_file() or suffix and (  # a file here is never a hub name
            suffix in FILE_SUFFIXES or path.exists() or not _hub_name(str(source)))):  # else a (dotted) hub name
        problem = f": unsupported format {path.suffix!r}" if suffix else " has no suffix naming its format"
        raise ValueError(f"data file {path}{problem}; use {', '.join(READ_SUFFIXES)} files or a hub data set name")
    if suffix in JSON_LINES_SUFFIXES:
        return _json_lines(_read_text(path), path)
    if suffix == ".json":
        text = _read_text(path)
        if not text.strip():
            raise ValueError(f"data file {path} is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # one row per line, named .json
                return _json_lines(text, path)
            raise ValueError(f"data file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
        if not isinstance(data, list):
            raise ValueError(f"data file {path} must hold a JSON list of rows; got a {type(data).__name__}")
        return data
    import datasets
    import pyarrow

    if suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        try:
            return datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
        except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError) as exc:  # no parquet, or damaged
            problem = " ".join(str(exc.__cause__ or exc).split())  # a damaged page: the reader's error, under datasets'
            raise ValueError(f"data file {path} could not be read as parquet: {problem}") from exc
    return datasets.load_dataset(str(source), split=split).to_list()  # a hub data set


def _hub_name(name: str) -> bool:
    """Whether ``name`` can name a hub data set (``owner/name``, whose name may hold a dot:
    ``allenai/tulu-2.5-preference-data``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).is_absolute()


def _json_lines(text: str, path: Path) -> Rows:
    """Rows of a JSON Lines text, split at LF, CRLF or CR only: ``str.splitlines`` would also split at
    U+2028, U+2029 and U+0085, which a JSON string holds as they are (``ensure_ascii=False``)."""
    rows, lines = [], []
    for number, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                rows.append(UnreadableRow(f"not valid JSON: {exc}", f"not valid JSON ({exc.msg})"))
            lines.append(f"line {number} of {path}")
    return Rows(rows, lines)


def check_rows(source: Any, *, split: str = "train", skip_invalid: bool = False) -> list[Any]:
    """The rows, read once and given the structural checks that need no tokenizer: bad data fails
    in a second, before any model is loaded for it (``skip_invalid``: only the file is checked).
    :func:`load_preference_data` takes the returned list."""
    check_switch("skip_invalid", skip_invalid)
    rows = read_rows(source, split=split)
    if not rows:
        raise ValueError(f"data {source} holds no preference row")
    if not skip_invalid:
        for index, row in enumerate(rows):
            try:
                normalize_row(index, row)
            except PreferenceDataError as exc:
                raise PreferenceDataError(index, exc.problem, _line(rows, index)) from None
    return rows


def load_preference_data(
    source: Any,
    tokenizer,
    *,
    split: str = "train",
    max_length: int = MAX_LENGTH,
    max_prompt_length: int | None = None,
    skip_invalid: bool = False,
    use_chat_template: bool | None = None,
    chat_template_kwargs: dict | None = None,
):
    """A ``datasets.Dataset`` of tokenized pairs, and the :class:`DataSummary` of the reading."""
    features, summary = tokenize_rows(
        read_rows(source, split=split), tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
        skip_invalid=skip_invalid, use_chat_template=use_chat_template, chat_template_kwargs=chat_template_kwargs,
    )
    return pairs_dataset(features), summary


def pairs_dataset(features: list[dict[str, list[int]]]):
    """Tokenized pairs as a ``datasets.Dataset`` of int32 columns, each built at once (datasets' own
    row-by-row building infers int64 and holds more copies of every token on the way)."""
    import datasets
    import pyarrow as pa

    columns = {name: pa.array([f[name] for f in features], type=pa.list_(pa.int32())) for name in features[0]}
    return datasets.Dataset(pa.table(columns))


PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


@dataclass
class PreferenceCollator:
    """Stacks pairs as ``[chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}]`` (the loss's layout),
    right-padded to the longest sequence of the batch."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        self.pad_token_id = check_integer("pad_token_id", self.pad_token_id, note=" (the tokenizer's pad or eos id)")
        if self.pad_to_multiple_of is not None:
            self.pad_to_multiple_of = check_integer("pad_to_multiple_of", self.pad_to_multiple_of, least=1,
                                                    note=" or None")

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
