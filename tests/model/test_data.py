"""Preference data: formats, exact scored positions, truncation, malformed rows, the collator."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers import LLAMA2, tiny_chat_tokenizer, tiny_sentencepiece_tokenizer, tiny_thinking_tokenizer  # noqa: E402
from qadapter.library.data import (  # noqa: E402
    IGNORE_INDEX,
    PreferenceCollator,
    PreferenceDataError,
    check_rows,
    load_preference_data,
    normalize_row,
    read_rows,
    tokenize_rows,
)

from bench.common import HH_DATA as HH  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def scored_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_conversational_pair_scores_exactly_the_response(tok):
    row = {"chosen": [user("hello"), assistant("Paris")], "rejected": [user("hello"), assistant("the world")]}
    (f,), summary = tokenize_rows([row], tok)
    assert scored_text(tok, f["chosen_input_ids"], f["chosen_labels"]) == "Paris<|im_end|>\n"
    assert scored_text(tok, f["rejected_input_ids"], f["rejected_labels"]) == "the world<|im_end|>\n"
    prompt = tok.apply_chat_template([user("hello")], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert f["chosen_labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert all(lab != IGNORE_INDEX for lab in f["chosen_labels"][n_prompt:])
    assert f["chosen_labels"][n_prompt:] == f["chosen_input_ids"][n_prompt:]
    assert summary.kept == 1 and summary.rows == 1


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "hello", "chosen": "Paris", "rejected": "the world"},
        {"prompt": [user("hello")], "chosen": [assistant("Paris")], "rejected": [assistant("the world")]},
        {"prompt": [user("hello")], "chosen": "Paris", "rejected": "the world"},
    ],
)
def test_prompt_format_equals_conversational_format(tok, row):
    conv = {"chosen": [user("hello"), assistant("Paris")], "rejected": [user("hello"), assistant("the world")]}
    assert tokenize_rows([row], tok)[0] == tokenize_rows([conv], tok)[0]


def test_plain_strings_without_template(tok):
    """Text is taken as it is, each response ended with the EOS token as TRL ends them (once)."""
    row = {"prompt": "Human: hi\n\nAssistant:", "chosen": " Paris", "rejected": " world<|im_end|>"}
    (f,), _ = tokenize_rows([row], tok, use_chat_template=False)
    assert scored_text(tok, f["chosen_input_ids"], f["chosen_labels"]) == " Paris<|im_end|>"
    assert scored_text(tok, f["rejected_input_ids"], f["rejected_labels"]) == " world<|im_end|>"
    assert tok.decode(f["chosen_input_ids"]).endswith("Human: hi\n\nAssistant: Paris<|im_end|>")


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_a_sentencepiece_response_is_tokenized_as_in_its_conversation(use_chat_template):
    """SentencePiece marks the start of any text it tokenizes as a word's (``▁``): a response tokenized
    alone after a prompt ending in a newline would begin with a space the conversation does not have.
    The pair's ids are the whole conversation's, tokenized at once (TRL's, for these rows)."""
    sp = tiny_sentencepiece_tokenizer()
    prompt = [user("the capital of France?")] if use_chat_template else "Question: the capital of France?\n"
    row = {"prompt": prompt, "chosen": "Paris", "rejected": " Rome is in Italy"}
    (f,), _ = tokenize_rows([row], sp, use_chat_template=use_chat_template)
    for side in ("chosen", "rejected"):
        if use_chat_template:
            whole = sp.apply_chat_template(prompt + [assistant(row[side])], tokenize=False)
            expected = sp(whole, add_special_tokens=False).input_ids
        else:
            expected = sp(prompt + row[side] + sp.eos_token).input_ids
        assert f[f"{side}_input_ids"] == expected, sp.convert_ids_to_tokens(f[f"{side}_input_ids"])
    first = f["chosen_labels"].index(next(label for label in f["chosen_labels"] if label != IGNORE_INDEX))
    assert not sp.convert_ids_to_tokens(f["chosen_input_ids"][first]).startswith("\u2581")


def test_a_prefix_space_byte_level_response_is_tokenized_as_in_its_text():
    """A byte-level BPE that adds a prefix space (``Ġ``) to a text it tokenizes: a response after a
    prompt ending in a newline is tokenized as the whole text is, without that space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=True), decoders.ByteLevel()
    bpe.train_from_iterator(["the capital of France is Paris"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spaced = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>")
    row = {"prompt": "Q: the capital?\n", "chosen": "Paris", "rejected": " France"}
    (f,), _ = tokenize_rows([row], spaced, use_chat_template=False)
    for side in ("chosen", "rejected"):
        assert f[f"{side}_input_ids"] == spaced(row["prompt"] + row[side] + "<|end|>").input_ids


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_whole_text_conversations_split_at_their_shared_prefix(tok, use_chat_template):
    """TRL's implicit prompt in text (raw HH-RLHF): the prompt is the shared prefix, the space that
    would end it starts each response instead; a prefix ending inside a word ends before the word."""
    implicit = {"chosen": "Human: hi\n\nAssistant: Paris", "rejected": "Human: hi\n\nAssistant: the world"}
    explicit = {"prompt": "Human: hi\n\nAssistant:", "chosen": " Paris", "rejected": " the world"}
    # Answers that start alike part inside a word: the prompt ends before that word, not inside it.
    alike = {"chosen": "Human: hi\n\nAssistant: Surely Paris.", "rejected": "Human: hi\n\nAssistant: Sure, Rome."}
    parted = {"prompt": "Human: hi\n\nAssistant:", "chosen": " Surely Paris.", "rejected": " Sure, Rome."}
    # Before punctuation (no space) and in a script without spaces, the prompt ends after it; a word with
    # nothing before it leaves the prefix whole.
    tight = {"chosen": "Human: hi\n\nAssistant:Surely Paris.", "rejected": "Human: hi\n\nAssistant:Sure, Rome."}
    tight_parted = {"prompt": "Human: hi\n\nAssistant:", "chosen": "Surely Paris.", "rejected": "Sure, Rome."}
    cjk = {"chosen": "用户：你好。助手：我喜欢猫", "rejected": "用户：你好。助手：我喜欢狗"}
    cjk_parted = {"prompt": "用户：你好。助手：", "chosen": "我喜欢猫", "rejected": "我喜欢狗"}
    assert normalize_row(0, {"chosen": "ab cd", "rejected": "ab ce"}) == normalize_row(
        0, {"prompt": "ab", "chosen": " cd", "rejected": " ce"})
    assert normalize_row(0, {"chosen": "abcd x", "rejected": "abce y"}) == normalize_row(
        0, {"prompt": "abc", "chosen": "d x", "rejected": "e y"})
    options = dict(use_chat_template=use_chat_template)
    for whole, split in ((implicit, explicit), (alike, parted), (tight, tight_parted), (cjk, cjk_parted)):
        assert normalize_row(0, whole) == normalize_row(0, split)
        assert tokenize_rows([whole], tok, **options)[0] == tokenize_rows([split], tok, **options)[0]
    for row, problem in [({"chosen": "Paris", "rejected": "world"}, "no shared prompt: the texts"),
                         ({"chosen": "Human: hi", "rejected": "Human: hi there"}, "'chosen' response is empty")]:
        with pytest.raises(PreferenceDataError, match=problem):
            normalize_row(0, row)


def test_a_prompt_rendered_beforehand_is_not_rendered_twice(tok):
    """Strings that already hold the template's markup (TRL's standard format, rendered by the user)
    are taken as they are: the same tokens as the conversation they were rendered from."""
    conversation = {"chosen": [user("hello"), assistant("Paris")], "rejected": [user("hello"), assistant("the world")]}
    prompt = tok.apply_chat_template([user("hello")], tokenize=False, add_generation_prompt=True)
    rendered = {"prompt": prompt, "chosen": "Paris<|im_end|>\n", "rejected": "the world<|im_end|>\n"}
    assert tokenize_rows([rendered], tok)[0] == tokenize_rows([conversation], tok)[0]
    mixed = {**rendered, "chosen": [assistant("Paris")]}
    with pytest.raises(PreferenceDataError, match="rendered with the chat template already"):
        tokenize_rows([mixed], tok)


def test_a_prompt_rendered_beforehand_in_plain_text_markup_is_not_rendered_twice():
    """Llama-2's template writes its turns in plain text ([INST] ... [/INST]) after the BOS: a prompt
    rendered with it beforehand and stored without the BOS text holds no special token, yet it begins
    as the template begins a user's turn, and is taken as given, not wrapped in a second [INST]."""
    sp = tiny_sentencepiece_tokenizer()
    sp.chat_template = LLAMA2
    row = {"prompt": [user("the capital of France?")], "chosen": "Paris", "rejected": "Rome"}
    (as_messages,), _ = tokenize_rows([row], sp)
    n_prompt = as_messages["chosen_labels"].count(IGNORE_INDEX)
    rendered = sp.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    (f,), _ = tokenize_rows([{**row, "prompt": rendered.removeprefix(sp.bos_token)}], sp)
    assert f["chosen_input_ids"][:n_prompt] == as_messages["chosen_input_ids"][:n_prompt]
    assert f["chosen_labels"].count(IGNORE_INDEX) == n_prompt
    (plain,), _ = tokenize_rows([{**row, "prompt": "the capital of France? [INST]"}], sp)  # [INST] not first: a question
    assert sp.decode(plain["chosen_input_ids"]).count("[INST]") == 2


# ChatML whose assistant turns may call tools, as Qwen's template writes them.
TOOL_CALLS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
              "{% for call in m.get('tool_calls') or [] %}<tool_call>{{ call['function']['name'] }}</tool_call>"
              "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_response_that_calls_a_tool_is_trained_on_its_call(tok):
    """An assistant message that only calls a tool (empty or null content, OpenAI's and TRL's way) is a
    response, not an empty one: its call, as the template writes it, is what is scored."""
    tok.chat_template = TOOL_CALLS
    call = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]
    for content in ("", None):
        row = {"prompt": [user("the weather in Paris?")], "chosen": [{"role": "assistant", "content": content,
                                                                       "tool_calls": call}],
               "rejected": [assistant("I cannot tell")]}
        (f,), _ = tokenize_rows([row], tok)
        scored = [i for i, label in zip(f["chosen_input_ids"], f["chosen_labels"]) if label != IGNORE_INDEX]
        assert tok.decode(scored) == "<tool_call>weather</tool_call><|im_end|>\n", content


def test_content_parts_are_their_texts_and_other_parts_are_refused(tok):
    """OpenAI's content parts: their texts joined by newlines, as the server reads a chat request;
    an image part is refused by its type, naming the row, never dropped."""
    parts = [{"type": "text", "text": "the capital"}, {"type": "text", "text": "of France?"}]
    as_parts = tokenize_rows([{"prompt": [{"role": "user", "content": parts}], "chosen": "Paris", "rejected": "Rome"}],
                             tok)[0]
    assert as_parts == tokenize_rows([{"prompt": [user("the capital\nof France?")], "chosen": "Paris",
                                       "rejected": "Rome"}], tok)[0]
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    with pytest.raises(PreferenceDataError, match=r"row 0: 'prompt'\[0\].content\[1\] is a part of type 'image_url'"):
        tokenize_rows([{"prompt": [{"role": "user", "content": [parts[0], image]}], "chosen": "a", "rejected": "b"}], tok)


def dated_tokenizer(day):
    """A ChatML tokenizer whose template writes a date first, as Llama-3.1's writes today's: ``day(k)``
    is the date of its k-th rendering of a conversation about France."""
    from helpers import CHATML

    tokenizer = tiny_chat_tokenizer()
    tokenizer.chat_template = "{{ 'Today ' ~ day ~ '\\n' }}" + CHATML
    render, calls = tokenizer.apply_chat_template, iter(range(1000))

    def dated(messages, *args, **kw):
        about = any("France" in m["content"] for m in messages)
        return render(messages, *args, day=day(next(calls)) if about else "0", **kw)

    tokenizer.apply_chat_template = dated
    return tokenizer


def test_a_row_rendered_as_the_date_turns_is_rendered_again():
    """The day turns between a row's prompt and its conversations: the prompt's own turns must not be
    scored as the response; the row is rendered again (the same day throughout), and a template that
    never renders a row twice alike is refused, naming why."""
    row = {"prompt": "the capital of France?", "chosen": "Paris", "rejected": "Rome"}
    (turned,), _ = tokenize_rows([row], dated_tokenizer(lambda k: "1" if k == 0 else "2"))
    (steady,), _ = tokenize_rows([row], dated_tokenizer(lambda k: "2"))
    assert turned == steady
    with pytest.raises(PreferenceDataError, match="renders the prompt's turns differently"):
        # Each try renders the prompt, both conversations and the turns before the answer: the prompt's date differs.
        tokenize_rows([row], dated_tokenizer(lambda k: "1" if k % 4 == 0 else "2"))


def test_pairs_the_same_after_rendering_or_truncation_are_refused_or_skipped(tok):
    """A pair whose two sequences are the same tokens teaches nothing: the same text given as a
    string and as a message, or answers that differ only past max_length."""
    same = {"prompt": "hello", "chosen": "Paris", "rejected": [assistant("Paris")]}
    late = {"prompt": "hello", "chosen": "Paris is the capital", "rejected": "Paris is the world"}
    good = {"prompt": "hello", "chosen": "Paris", "rejected": "world"}
    with pytest.raises(PreferenceDataError, match="row 0: chosen and rejected are the same tokens$"):
        tokenize_rows([same], tok)
    with pytest.raises(PreferenceDataError, match="row 1: .*within max_length 12: they differ only past it"):
        tokenize_rows([good, late], tok, max_length=12, max_prompt_length=8)
    assert tokenize_rows([late], tok, max_length=64)[1].kept == 1
    features, summary = tokenize_rows([same, late, good], tok, max_length=12, max_prompt_length=8, skip_invalid=True)
    assert len(features) == summary.kept == 1 and sum(summary.skipped.values()) == 2


def _with_template(tok, template):
    copy = tiny_chat_tokenizer()
    copy.chat_template = template
    return copy


def test_a_template_that_refuses_a_row_names_it(tok):
    """A template's own refusal (Gemma's: no system role) is that row's error, skippable."""
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    strict = _with_template(tok, template)
    good = {"prompt": "hello", "chosen": "Paris", "rejected": "world"}
    system = {"prompt": [{"role": "system", "content": "be brief"}, user("hello")], "chosen": "Paris",
              "rejected": "world"}
    with pytest.raises(PreferenceDataError, match="row 1: the chat template fails on this row: System role not"):
        tokenize_rows([good, system], strict)
    features, summary = tokenize_rows([good, system], strict, skip_invalid=True)
    assert summary.kept == 1 and len(summary.skipped) == 1


def test_a_generation_prompt_the_answers_do_not_start_with(tok, caplog):
    """A template whose generation prompt is not how a rendered answer begins (DeepSeek-R1's
    ``<think>``): the prompt ends where the two agree, as TRL's, with a warning."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    thinking = _with_template(tok, template)
    row = {"prompt": "hello", "chosen": "Paris", "rejected": "world"}
    with caplog.at_level("WARNING", logger="qadapter.library.data"):
        (f,), _ = tokenize_rows([row], thinking)
    assert "'<think>\\n' is left out of the prompt" in caplog.text, template
    assert f == tokenize_rows([row], tok)[0][0]  # the history renders as ChatML's


def test_tools_reach_the_template(tok):
    template = ("{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t['name'] }}{% endfor %}<|im_end|>\n"
                "{% endif %}" + tok.chat_template)
    with_tools = _with_template(tok, template)
    row = {"prompt": "hello", "chosen": "Paris", "rejected": "world"}
    (f,), _ = tokenize_rows([{**row, "tools": json.dumps([{"name": "search"}])}], with_tools)
    assert "<|im_start|>system\nsearch<|im_end|>" in tok.decode(f["chosen_input_ids"])
    assert tokenize_rows([row], with_tools)[0] == tokenize_rows([row], tok)[0]
    with pytest.raises(PreferenceDataError, match="'tools' must be a list"):
        normalize_row(0, {**row, "tools": {"name": "search"}})


def test_chat_template_options_reach_the_template_a_rows_own_over_the_given(tok, caplog):
    """Qwen3's ``enable_thinking=False``: the prompt ends in the empty think block the responses follow;
    a row's ``chat_template_kwargs`` column (TRL's) is taken over the options every row gets."""
    thinking = tiny_thinking_tokenizer()
    row = {"prompt": "hello", "chosen": "Paris", "rejected": "world"}

    def prompt(features):
        f = features[0]
        return thinking.decode([t for t, label in zip(f["chosen_input_ids"], f["chosen_labels"]) if label == IGNORE_INDEX])

    quiet = {"enable_thinking": False}
    assert prompt(tokenize_rows([row], thinking)[0]).endswith("<|im_start|>assistant\n")
    assert prompt(tokenize_rows([row], thinking, chat_template_kwargs=quiet)[0]).endswith("</think>\n\n")
    own = tokenize_rows([{**row, "chat_template_kwargs": json.dumps(quiet)}], thinking)[0]
    assert own == tokenize_rows([row], thinking, chat_template_kwargs=quiet)[0]
    louder = tokenize_rows([{**row, "chat_template_kwargs": {"enable_thinking": True}}], thinking,
                           chat_template_kwargs=quiet)[0]
    assert louder == tokenize_rows([row], thinking)[0]
    thinking.chat_template = None  # nothing renders with them: said
    with caplog.at_level("WARNING", logger="qadapter.library.data"):
        tokenize_rows([row], thinking, chat_template_kwargs=quiet)
    assert 'chat_template_kwargs {"enable_thinking": false} change nothing' in caplog.text


def test_a_rows_option_a_column_store_left_null_is_not_set():
    """A parquet or datasets column of options is a struct: each row holds every key some row has, the
    others null. A null is no option of that row, so the options every row gets stay."""
    import datasets

    thinking = tiny_thinking_tokenizer()
    row = {"prompt": "hello", "chosen": "Paris", "rejected": "world"}
    column = datasets.Dataset.from_list([{**row, "chat_template_kwargs": {"enable_thinking": False}},
                                         {**row, "chat_template_kwargs": {"reasoning_effort": "low"}}])
    assert column[1]["chat_template_kwargs"] == {"enable_thinking": None, "reasoning_effort": "low"}
    quiet = {"enable_thinking": False}
    features, _ = tokenize_rows(column.to_list(), thinking, chat_template_kwargs=quiet)
    assert features[1] == tokenize_rows([row], thinking, chat_template_kwargs=quiet)[0][0]


@pytest.mark.parametrize("options, message", [
    ([1], "must be an object of named options"),
    ({"tokenize": False}, "cannot set tokenize: the rendering sets it"),
    ({"messages": [], "enable_thinking": False}, "cannot set messages: the rendering sets it"),
    ({"conversations": []}, "cannot set conversations: the rendering sets it"),
    ({"when": float("nan")}, "must hold JSON values"),
    ({"when": object()}, "must hold JSON values"),
])
def test_bad_chat_template_options_are_refused_naming_them(tok, options, message):
    row = {"prompt": "hello", "chosen": "Paris", "rejected": "world"}
    with pytest.raises(ValueError, match=f"chat_template_kwargs {message}"):
        tokenize_rows([row], tok, chat_template_kwargs=options)
    with pytest.raises(PreferenceDataError, match=f"row 0: 'chat_template_kwargs' {message}"):
        normalize_row(0, {**row, "chat_template_kwargs": options})
    with pytest.raises(PreferenceDataError, match="'chat_template_kwargs' must be a JSON object; got '{enable_thinking: false}'"):
        normalize_row(0, {**row, "chat_template_kwargs": "{enable_thinking: false}"})


def test_chat_template_options_may_be_any_mapping():
    """A read-only mapping (``types.MappingProxyType``, a frozen config's) is options as a dict is."""
    import types

    from qadapter.library.data import check_template_options

    options = check_template_options(types.MappingProxyType({"enable_thinking": False}))
    assert options == {"enable_thinking": False} and type(options) is dict


def test_prompt_length_defaults_to_half_and_must_leave_room(tok):
    row = {"prompt": "the capital of France is " * 30, "chosen": "Paris " * 40, "rejected": "world " * 40}
    (f,), _ = tokenize_rows([row], tok, max_length=24)
    assert f["chosen_labels"].count(IGNORE_INDEX) == 12
    for max_prompt_length in (24, 100):
        with pytest.raises(ValueError, match=rf"max_prompt_length \({max_prompt_length}\) must be below max_length "):
            tokenize_rows([row], tok, max_length=24, max_prompt_length=max_prompt_length)


def test_truncation_keeps_the_prompt_end_and_a_scored_token(tok):
    long_prompt = "the capital of France is " * 30
    row = {"prompt": long_prompt, "chosen": "Paris " * 40, "rejected": "world"}
    (f,), summary = tokenize_rows([row], tok, max_length=24, max_prompt_length=10)
    for side in ("chosen", "rejected"):
        ids, labels = f[f"{side}_input_ids"], f[f"{side}_labels"]
        assert len(ids) <= 24
        assert labels[0] == IGNORE_INDEX and any(lab != IGNORE_INDEX for lab in labels)
    n_prompt = f["rejected_labels"].count(IGNORE_INDEX)
    assert f["chosen_labels"].count(IGNORE_INDEX) == n_prompt <= 10  # both sides share the prompt
    full_prompt = tok(tok.apply_chat_template([user(long_prompt)], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
    assert f["chosen_input_ids"][:n_prompt] == full_prompt[-n_prompt:]  # cut from the left
    assert summary.truncated == 1


@pytest.mark.parametrize("template_bos", [True, False])
def test_a_prompt_rendered_beforehand_has_the_bos_its_messages_would(template_bos):
    """Rendered with the template beforehand (its markup found), a prompt is tokenized as given, without
    special tokens; stored without the BOS text a template starts with (Llama-3's), it gets the BOS, as
    the same conversation in messages has it; after a template without one (Zephyr's), none."""
    sp = tiny_sentencepiece_tokenizer()
    if template_bos:
        sp.chat_template = "{{ bos_token }}" + sp.chat_template
    row = {"prompt": [user("the capital of France?")], "chosen": "Paris", "rejected": "Rome"}
    (as_messages,), _ = tokenize_rows([row], sp)
    rendered = sp.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(sp.bos_token) == template_bos and sp.eos_token in rendered
    n_prompt = as_messages["chosen_labels"].count(IGNORE_INDEX)
    for prompt in (rendered.removeprefix(sp.bos_token), rendered):
        (f,), _ = tokenize_rows([{**row, "prompt": prompt}], sp)
        ids = f["chosen_input_ids"]
        assert ids[:n_prompt] == as_messages["chosen_input_ids"][:n_prompt], sp.convert_ids_to_tokens(ids)
        assert f["chosen_labels"].count(IGNORE_INDEX) == n_prompt and ids.count(sp.bos_token_id) == template_bos


def test_a_prompt_cut_from_the_left_keeps_the_bos_its_tokenizer_starts_texts_with():
    """A tokenizer that starts every text with BOS (Llama's): a model never sees a sequence without it,
    so a prompt cut from the left keeps it; a template's turn marker (SmolLM2's BOS) is cut as text."""
    sp = tiny_sentencepiece_tokenizer()
    row = {"prompt": "the capital of France is " * 30, "chosen": "Paris", "rejected": "Rome is in Italy"}
    (f,), summary = tokenize_rows([row], sp, max_length=24, max_prompt_length=10, use_chat_template=False)
    whole = sp(row["prompt"]).input_ids
    assert whole[0] == sp.bos_token_id and summary.truncated == 1
    n_prompt = f["chosen_labels"].count(IGNORE_INDEX)
    assert f["chosen_input_ids"][:n_prompt] == whole[:1] + whole[-(n_prompt - 1):] and n_prompt == 10
    (f,), _ = tokenize_rows([row], sp, max_length=24, max_prompt_length=1, use_chat_template=False)
    assert f["chosen_input_ids"][:1] == whole[-1:]  # a prompt of one token: the last one


BAD_ROWS = [
    ({"rejected": [user("a"), assistant("b")]}, "missing key 'chosen'"),
    ({"chosen": [user("a"), assistant("b")]}, "missing key 'rejected'"),
    ("just a string", "must be a JSON object"),
    ({"chosen": "text", "rejected": [user("a"), assistant("b")]}, "without a prompt, 'chosen' and 'rejected' must "
                                                                  "both be texts or both lists of messages; got str and list"),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]}, "chosen is identical to rejected"),
    ({"chosen": [user("a"), assistant("")], "rejected": [user("a"), assistant("b")]}, "'chosen' response is empty"),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("x"), assistant("c")]}, "no shared prompt"),
    ({"chosen": [user("a"), {"role": "assistant"}], "rejected": [user("a"), assistant("c")]}, "must be a message"),
    ({"chosen": [user("a"), {"role": "robot", "content": "b"}], "rejected": [user("a"), assistant("c")]}, "unknown role"),
    ({"chosen": [user("a"), assistant("b"), user("more")], "rejected": [user("a"), assistant("c")]},
     "non-assistant turn"),
    ({"prompt": "", "chosen": "b", "rejected": "c"}, "'prompt' is empty"),
    ({"prompt": "a", "chosen": "   ", "rejected": "c"}, "'chosen' response is empty"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "'chosen' must be a string or a list"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "identical"),
    ({"chosen": "text", "rejected": 3}, "both be texts or both lists of messages; got str and int"),
]


@pytest.mark.parametrize("row, problem", BAD_ROWS)
def test_malformed_row_names_index_and_problem(tok, row, problem):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    with pytest.raises(PreferenceDataError, match=f"preference row 1: .*{problem}"):
        tokenize_rows([good, row], tok)


def test_a_malformed_row_error_crosses_a_process_boundary_whole(tmp_path):
    """Rows checked in worker processes (a process pool, datasets.map's num_proc) send a bad row's
    error back pickled: it must rebuild as itself, not fail (a process pool then reports its worker
    gone, the row and its problem lost)."""
    import pickle

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"chosen": "b"}) + "\n")
    with pytest.raises(PreferenceDataError) as raised:
        check_rows(data)
    again = pickle.loads(pickle.dumps(raised.value))
    assert type(again) is PreferenceDataError and str(again) == str(raised.value)
    assert (again.index, again.problem, again.reason) == (1, "missing key 'rejected'", "missing key 'rejected'")
    assert f"line 2 of {data}" in str(again)


def test_skip_invalid_counts_what_it_skipped(tok):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    rows = [good, BAD_ROWS[0][0], good, BAD_ROWS[4][0], BAD_ROWS[0][0]]
    features, summary = tokenize_rows(rows, tok, skip_invalid=True)
    assert len(features) == 2 and summary.kept == 2 and summary.rows == 5
    assert summary.skipped == {"missing key 'chosen'": 2, "chosen is identical to rejected": 1}
    assert "2/5 pairs kept" in str(summary)
    with pytest.raises(ValueError, match="no usable preference pair"):
        tokenize_rows([BAD_ROWS[0][0]], tok, skip_invalid=True)


@pytest.mark.parametrize("batch", [1, 2, 3, 512])
def test_batched_tokenizing_is_row_by_row_tokenizing(tok, monkeypatch, batch):
    """Rows are tokenized a batch at a time: any batch size gives the same pairs as one row at a time,
    and the first bad row in order is the one refused, whichever step (rendering or tokenizing)
    finds it."""
    from qadapter.library import data

    rows = [{"prompt": f"q{k}", "chosen": f"yes {k}", "rejected": [assistant(f"no {k}")]} for k in range(7)]
    rows += [{"chosen": [user("hi"), assistant("a b c")], "rejected": [user("hi"), assistant("a b d")]}]
    class OneTextAtATime:  # the tokenizer, each text of a batch encoded alone
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, texts, **options):
            return {"input_ids": [tok(text, **options)["input_ids"] for text in texts]}

    one_by_one = [tokenize_rows([row], OneTextAtATime(), max_length=16)[0][0] for row in rows]
    monkeypatch.setattr(data, "TOKENIZE_BATCH", batch)
    assert tokenize_rows(rows, tok, max_length=16)[0] == one_by_one
    late = {"prompt": "x", "chosen": "same", "rejected": [assistant("same")]}  # found once tokenized
    early = {"prompt": "x", "chosen": "a"}  # found before rendering
    with pytest.raises(PreferenceDataError, match="row 1: chosen and rejected are the same tokens"):
        tokenize_rows([rows[0], late, early], tok)
    with pytest.raises(PreferenceDataError, match="row 1: missing key 'rejected'"):
        tokenize_rows([rows[0], early, late], tok)
    features, summary = tokenize_rows([late, *rows, early], tok, max_length=16, skip_invalid=True)
    assert features == one_by_one and summary.kept == len(rows) and sum(summary.skipped.values()) == 2


def test_collator_layout_and_padding(tok):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c c c c"}, {"prompt": "hello world", "chosen": "x", "rejected": "y"}]
    features, _ = tokenize_rows(rows, tok)
    batch = PreferenceCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)(features)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == 4 and ids.shape[1] % 8 == 0
    order = [features[0]["chosen_input_ids"], features[1]["chosen_input_ids"],
             features[0]["rejected_input_ids"], features[1]["rejected_input_ids"]]
    for row, seq in enumerate(order):
        assert ids[row, : len(seq)].tolist() == seq
        assert mask[row].sum() == len(seq)
        assert (labels[row, len(seq):] == IGNORE_INDEX).all()


def test_file_formats(tok, tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"chosen": [user("q"), assistant("r")],
                                                             "rejected": [user("q"), assistant("s")]}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert read_rows(jsonl) == rows == read_rows(tmp_path / "d.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(PreferenceDataError, match=r"preference row 1 \(line 2 of .*\): not valid JSON"):
        load_preference_data(bad, tok)
    _, skipped = load_preference_data(bad, tok, skip_invalid=True)  # an unreadable line is an invalid row
    assert skipped.kept == 1 and sum(skipped.skipped.values()) == 1
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.jsonl")
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([rows[0]])
    parquet = tmp_path / "d.parquet"
    ds.to_parquet(str(parquet))
    assert read_rows(parquet) == [rows[0]] == read_rows(ds)
    data, summary = load_preference_data(jsonl, tok)
    assert len(data) == 2 and summary.kept == 2


@pytest.mark.skipif(not HH.is_file(), reason="shared HH-RLHF data not present beside the project")
def test_hh_rlhf_rows_score_only_the_final_assistant_turns(tok):
    rows = read_rows(HH)
    with pytest.raises(PreferenceDataError, match="response is empty"):
        tokenize_rows(rows, tok, max_length=4096, max_prompt_length=4000)
    features, summary = tokenize_rows(rows, tok, max_length=4096, max_prompt_length=4000, skip_invalid=True)
    assert summary.rows == 2000 and summary.kept + sum(summary.skipped.values()) == 2000
    assert summary.kept >= 1990  # a few real rows have an empty chosen response
    valid = []
    for i, r in enumerate(rows):
        try:
            valid.append(normalize_row(i, r))
        except PreferenceDataError:
            pass
    for f, pair in zip(features[:200], valid[:200]):
        for side in ("chosen", "rejected"):
            expected = "".join(f"{m['content']}<|im_end|>\n<|im_start|>assistant\n" for m in getattr(pair, side))
            expected = expected[: -len("<|im_start|>assistant\n")]
            # Consecutive assistant turns render as separate turns: the scored text is all of them.
            text = scored_text(tok, f[f"{side}_input_ids"], f[f"{side}_labels"])
            assert text.replace("<|im_start|>assistant\n", "") == expected.replace("<|im_start|>assistant\n", "")
    assert any(len(p.chosen) > 1 or len(p.rejected) > 1 for p in valid)  # rows that differ earlier


@pytest.mark.parametrize("name, content, message", [
    ("pairs.csv", b"prompt,chosen,rejected\n", "unsupported format '.csv'; use .json, .jsonl, .ndjson, .parquet"),
    ("pairs.json", b"", "is empty"),
    ("pairs.json", b'[{"prompt": "a",', "is not valid JSON (line 1, column"),
    ("pairs.json", b'{"prompt": "a"}', "must hold a JSON list of rows; got a dict"),
    ("pairs.jsonl", b'{"prompt": "caf\xe9"}\n', "is not UTF-8 text (byte 15"),
    ("pairs", b'{"prompt": "a"}\n', "has no suffix naming its format; use .json, .jsonl, .ndjson, .parquet"),
])
def test_unreadable_files_are_named(tmp_path, name, content, message):
    """Each names the file and what is wrong; a .csv, or a file here without a suffix, is never looked up on
    the hub."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        read_rows(path)
    assert str(path) in str(info.value)


def test_a_null_prompt_is_an_implicit_one(tok):
    """A column store (parquet, a Dataset) mixing explicit and implicit rows gives the implicit ones
    a null prompt: the same as leaving the key out."""
    conversation = {"chosen": [user("hello"), assistant("Paris")], "rejected": [user("hello"), assistant("world")]}
    assert tokenize_rows([{"prompt": None, **conversation}], tok)[0] == tokenize_rows([conversation], tok)[0]
    with pytest.raises(PreferenceDataError, match="no shared prompt"):
        tokenize_rows([{"prompt": None, "chosen": "b", "rejected": "c"}], tok)


def test_an_empty_prompt_message_is_an_empty_prompt(tok):
    with pytest.raises(PreferenceDataError, match="every message of 'prompt' is empty"):
        normalize_row(0, {"prompt": [user("  ")], "chosen": "b", "rejected": "c"})


def test_rows_of_a_jsonl_file_are_named_by_their_line(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    path.write_text(f"{good}\n\n\n{good}\n\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(PreferenceDataError, match=rf"preference row 2 \(line 6 of {re.escape(str(path))}\): missing"):
        load_preference_data(path, tok)


def test_json_lines_in_a_json_file(tmp_path):
    """``datasets.Dataset.to_json`` writes JSON Lines under a .json name, which ``load_dataset`` reads."""
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_rows(path) == rows


def test_messages_stored_as_json_strings_are_messages(tok):
    """A table exported with its message columns as JSON text (pandas, CSV tools): the messages, not
    their JSON text, are trained on."""
    conv = {"chosen": [user("hello"), assistant("Paris")], "rejected": [user("hello"), assistant("the world")]}
    as_text = {key: json.dumps(value) for key, value in conv.items()}
    assert tokenize_rows([as_text], tok)[0] == tokenize_rows([conv], tok)[0]
    split = {"prompt": json.dumps([user("hello")]), "chosen": json.dumps([assistant("Paris")]),
             "rejected": "the world"}
    assert tokenize_rows([split], tok)[0] == tokenize_rows([conv], tok)[0]
    text = {"prompt": "a list: [{1}]", "chosen": '[{"a": 1}]', "rejected": "no"}  # JSON, not messages: text
    assert normalize_row(0, text).chosen == '[{"a": 1}]'


def test_a_text_prompt_beside_whole_conversations_is_their_shared_turns(tok):
    """UltraFeedback's binarized layout: a text prompt, and responses that are the whole conversation,
    the prompt's turn included; the prompt is the shared turns, as TRL's maybe_extract_prompt takes it."""
    conv = {"chosen": [user("hello"), assistant("Paris")], "rejected": [user("hello"), assistant("the world")]}
    assert tokenize_rows([{"prompt": "hello", **conv}], tok)[0] == tokenize_rows([conv], tok)[0]


def test_skipped_rows_are_counted_by_their_problem_not_its_place(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    path.write_text("\n".join([good, good[:7], good[:12], good[:20], good]) + "\n")  # cut at three places
    _, summary = load_preference_data(path, tok, skip_invalid=True)
    assert dict(summary.skipped) == {"not valid JSON (Unterminated string starting at)": 3}
    with pytest.raises(PreferenceDataError, match=r"\(line 2 of .*\): not valid JSON: .*column"):
        load_preference_data(path, tok)  # the error itself says where


def test_message_problems_are_counted_by_kind_not_by_position(tok):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    bad = [{"chosen": [user("q"), {"role": "bot", "content": "x"}], "rejected": [user("q"), assistant("y")]},
           {"chosen": [user("q"), user("r"), {"role": "bot", "content": "x"}], "rejected": [user("q"), assistant("y")]},
           {"chosen": [user("q"), "text"], "rejected": [user("q"), assistant("y")]}]
    _, summary = tokenize_rows([good, *bad], tok, skip_invalid=True)
    assert dict(summary.skipped) == {"'chosen' has a message of an unknown role (not one of system, user, assistant, "
                                     "tool)": 2, "'chosen' holds something that is not a message {'role', 'content'}": 1}
    with pytest.raises(PreferenceDataError, match=r"'chosen'\[2\] has unknown role 'bot'"):  # the error: where
        tokenize_rows(bad[1:2], tok)


def test_a_part_of_a_file_names_its_rows_by_their_lines(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    path.write_text("\n".join([good, good, good, json.dumps({"prompt": "a", "chosen": "b"})]) + "\n")
    heldout = read_rows(path)[2:]
    with pytest.raises(PreferenceDataError, match=rf"\(line 4 of {re.escape(str(path))}\): missing"):
        tokenize_rows(heldout, tok)


def test_suffixes_in_any_case_and_dotted_hub_names(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    for name in ("d.JSONL", "d.ndjson"):
        (tmp_path / name).write_text(json.dumps(rows[0]) + "\n")
        assert read_rows(tmp_path / name) == rows
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: asked.append((name, split)) or
                        datasets.Dataset.from_list(rows))
    for name in ("allenai/tulu-2.5-preference-data", "jondurbin/truthy-dpo-v0.1"):  # a dot in a hub name
        assert read_rows(name) == rows
    assert asked == [("allenai/tulu-2.5-preference-data", "train"), ("jondurbin/truthy-dpo-v0.1", "train")]
    with pytest.raises(ValueError, match=r"unsupported format '.csv'"):
        read_rows("owner/pairs.csv")  # a file type, not looked up on the hub


def test_json_lines_are_split_at_line_ends_only(tmp_path):
    """JSON keeps U+2028, U+2029 and U+0085 in a string as they are (``json.dumps(..., ensure_ascii=False)``
    writes them): they are text of the row, not the end of its line. CRLF and CR line ends are line ends."""
    rows = [{"prompt": "a\u2028b\u2029c\u0085d", "chosen": "你好 😀\r\n", "rejected": "c"},
            {"prompt": "e", "chosen": "f", "rejected": "g"}]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for end in ("\n", "\r\n", "\r"):
        path = tmp_path / "d.jsonl"
        path.write_bytes(("\ufeff" + end.join(lines) + end).encode())
        read = read_rows(path)
        assert read == rows and read.lines == [f"line {n} of {path}" for n in (1, 2)]


def test_a_lone_surrogate_is_a_malformed_row(tok, tmp_path):
    """JSON's ``\\ud800`` escape outside a pair reads as a string no tokenizer can encode: the row is
    refused by name (its line in the file) before any model loads, or skipped, not an error of the tokenizer."""
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    path = tmp_path / "d.jsonl"
    path.write_text(f'{good}\n{{"prompt": "x \\ud800 y", "chosen": "b", "rejected": "c"}}\n'
                    '{"prompt": "ok \\ud83d\\ude00", "chosen": [{"role": "assistant", "content": "\\udfff"}], "rejected": "c"}\n')
    with pytest.raises(PreferenceDataError, match=rf"row 1 \(line 2 of {re.escape(str(path))}\): 'prompt' .*lone surrogate"):
        check_rows(path)
    with pytest.raises(PreferenceDataError, match=r"row 1 \(line 2 of .*\): 'prompt' .*lone surrogate"):
        load_preference_data(path, tok)
    features, summary = tokenize_rows(read_rows(path), tok, skip_invalid=True)
    assert summary.kept == 1 and sum(summary.skipped.values()) == 2
    as_text = json.dumps([assistant("\ud800")])  # messages, and tools, stored as JSON text: their escapes
    assert "\\ud800" in as_text
    for row, key in (({"prompt": "a", "chosen": as_text, "rejected": "c"}, "chosen"),
                     ({"prompt": "a", "chosen": "b", "rejected": "c", "tools": json.dumps([{"name": "\udfff"}])},
                      "tools")):
        with pytest.raises(PreferenceDataError, match=f"row 0: '{key}' holds a lone surrogate"):
            tokenize_rows([row], tok)


def test_a_damaged_parquet_file_is_named(tmp_path):
    """A file that is no parquet, or one whose pages are damaged (read only once the rows are), is a
    bad --data file named in one line, not a reader's error (exit 3)."""
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "a" * 200, "chosen": "b", "rejected": "c"}] * 4).to_parquet(str(path))
    whole = path.read_bytes()
    for damaged in (b"not parquet", whole[:4] + b"\0" * 200 + whole[204:]):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"data file {re.escape(str(path))} could not be read as parquet: \S"):
            read_rows(path)


def test_a_response_cut_to_fit_counts_as_truncated(tok):
    """A prompt that fits with a response cut on the right is a truncated pair, as a prompt cut is."""
    row = {"prompt": "hello", "chosen": "Paris " * 40, "rejected": "Rome"}
    (f,), summary = tokenize_rows([row], tok, max_length=24)
    n_prompt = f["chosen_labels"].count(IGNORE_INDEX)
    whole = tokenize_rows([row], tok, max_length=4096)[0][0]
    assert whole["chosen_labels"].count(IGNORE_INDEX) == n_prompt  # the prompt kept whole
    assert len(f["chosen_input_ids"]) == 24 < len(whole["chosen_input_ids"])
    assert f["chosen_input_ids"] == whole["chosen_input_ids"][:24]
    assert summary.truncated == 1
    assert tokenize_rows([row], tok, max_length=4096)[1].truncated == 0
