"""Preference data: formats, exact scored positions, truncation, malformed rows, the collator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers import tiny_chat_tokenizer  # noqa: E402
from qadapter.library.data import (  # noqa: E402
    IGNORE_INDEX,
    PreferenceCollator,
    PreferenceDataError,
    load_preference_data,
    normalize_row,
    read_rows,
    tokenize_rows,
)

HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf-harmless-2000.jsonl"


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
    row = {"prompt": "Human: hi\n\nAssistant:", "chosen": " Paris", "rejected": " world"}
    (f,), _ = tokenize_rows([row], tok, use_chat_template=False)
    assert scored_text(tok, f["chosen_input_ids"], f["chosen_labels"]) == " Paris"
    assert tok.decode(f["chosen_input_ids"]).endswith("Human: hi\n\nAssistant: Paris")


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
    # A prompt budget larger than max_length still leaves one scored token.
    (g,), _ = tokenize_rows([row], tok, max_length=8, max_prompt_length=100)
    assert len(g["chosen_input_ids"]) == 8 and g["chosen_labels"][-1] != IGNORE_INDEX
    assert g["chosen_labels"][:-1] == [IGNORE_INDEX] * 7


BAD_ROWS = [
    ({"rejected": [user("a"), assistant("b")]}, "missing key 'chosen'"),
    ({"chosen": [user("a"), assistant("b")]}, "missing key 'rejected'"),
    ("just a string", "must be a JSON object"),
    ({"chosen": "text", "rejected": [user("a"), assistant("b")]}, "'chosen' must be a string or a list"),
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
]


@pytest.mark.parametrize("row, problem", BAD_ROWS)
def test_malformed_row_names_index_and_problem(tok, row, problem):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    with pytest.raises(PreferenceDataError, match=f"preference row 1: .*{problem}"):
        tokenize_rows([good, row], tok)


def test_skip_invalid_counts_what_it_skipped(tok):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    rows = [good, BAD_ROWS[0][0], good, BAD_ROWS[4][0], BAD_ROWS[0][0]]
    features, summary = tokenize_rows(rows, tok, skip_invalid=True)
    assert len(features) == 2 and summary.kept == 2 and summary.rows == 5
    assert summary.skipped == {"missing key 'chosen'": 2, "chosen is identical to rejected": 1}
    assert "2/5 pairs kept" in str(summary)
    with pytest.raises(ValueError, match="no usable preference pair"):
        tokenize_rows([BAD_ROWS[0][0]], tok, skip_invalid=True)


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
    with pytest.raises(PreferenceDataError, match="preference row 1: line 2 of .* is not valid JSON"):
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
    ("pairs.csv", b"prompt,chosen,rejected\n", "unsupported format '.csv'; use .json, .jsonl, .parquet"),
    ("pairs.json", b"", "is empty"),
    ("pairs.json", b'[{"prompt": "a",', "is not valid JSON (line 1, column"),
    ("pairs.json", b'{"prompt": "a"}', "must hold a JSON list of rows; got a dict"),
    ("pairs.jsonl", b'{"prompt": "caf\xe9"}\n', "is not UTF-8 text (byte 15"),
])
def test_unreadable_files_are_named(tmp_path, name, content, message):
    """Each names the file and what is wrong; a .csv is never looked up on the hub."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        read_rows(path)
    assert str(path) in str(info.value)


def test_a_null_prompt_says_what_to_do(tok):
    with pytest.raises(PreferenceDataError, match="'prompt' is null"):
        tokenize_rows([{"prompt": None, "chosen": "b", "rejected": "c"}], tok)
