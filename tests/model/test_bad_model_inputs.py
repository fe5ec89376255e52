"""The bad-input table of the model layer: the data loader (every format, malformed rows and files,
encodings), the CLI verbs (argparse errors exit 2 naming the argument), adapter saving and loading
(missing, extra, renamed and corrupt files, another base), generation options and the lm-eval
model's arguments. Each case names the error type and a fragment of its message, or the valid
result. The tiny models are built once per module."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
from helpers import perturb_adapter, save_tiny_base, tiny_causal_lm, tiny_chat_tokenizer  # noqa: E402
from qadapter.cli import main  # noqa: E402
from qadapter.library.data import (  # noqa: E402
    PreferenceDataError,
    check_rows,
    normalize_row,
    read_rows,
    tokenize_rows,
)
from qadapter.library.model import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError, QAdapterModel  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

GOOD = {"prompt": "the capital of", "chosen": " France is Paris", "rejected": " hello world"}
CONV_C = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
CONV_R = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Paris"}]


def expect(call, expected, fragment=None):
    if isinstance(expected, type) or isinstance(expected, tuple):
        with pytest.raises(expected) as info:
            call()
        assert fragment in str(info.value), str(info.value)
        return info.value
    result = call()
    assert expected(result), result
    return result


# ------------------------------------------------------------------------------ rows
ROWS = [
    ("not-a-dict", ["a", "b"], "must be a JSON object, got list"),
    ("string-row", "prompt", "must be a JSON object, got str"),
    ("none-row", None, "must be a JSON object, got NoneType"),
    ("missing-chosen", {"prompt": "p", "rejected": "r"}, "missing key 'chosen'"),
    ("missing-rejected", {"prompt": "p", "chosen": "c"}, "missing key 'rejected'"),
    ("prompt-null", {"prompt": None, "chosen": "c", "rejected": "r"}, "no shared prompt: the texts"),
    ("prompt-empty-messages", {"prompt": [{"role": "user", "content": ""}], "chosen": "c", "rejected": "r"},
     "every message of 'prompt' is empty"),
    ("prompt-empty", {"prompt": "  ", "chosen": "c", "rejected": "r"}, "'prompt' is empty"),
    ("prompt-empty-list", {"prompt": [], "chosen": "c", "rejected": "r"}, "'prompt' is an empty list"),
    ("prompt-number", {"prompt": 3, "chosen": "c", "rejected": "r"}, "'prompt' must be a string or a list"),
    ("prompt-bad-message", {"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "'prompt'[0] must be a message"),
    ("prompt-unknown-role", {"prompt": [{"role": "bot", "content": "x"}], "chosen": "c", "rejected": "r"},
     "unknown role 'bot'"),
    ("chosen-number", {"prompt": "p", "chosen": 1, "rejected": "r"}, "'chosen' must be a string or a list"),
    ("rejected-dict", {"prompt": "p", "chosen": "c", "rejected": {"a": 1}}, "'rejected' must be a string or a list"),
    ("identical", {"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen is identical to rejected"),
    ("chosen-empty", {"prompt": "p", "chosen": "", "rejected": "r"}, "'chosen' response is empty"),
    ("rejected-user-turn", {"prompt": "p", "chosen": "c", "rejected": [{"role": "user", "content": "x"}]},
     "non-assistant turn"),
    ("conversations-differ", {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                              "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "b"}]},
     "differ from their first message"),
    ("conversation-string", {"chosen": "c", "rejected": "r"}, "no shared prompt: the texts"),
    ("conversation-mixed", {"chosen": "c", "rejected": CONV_R}, "must both be texts or both lists of messages; got str and list"),
    ("tools-not-a-list", {**GOOD, "tools": "{not json"}, "'tools' is a string that is not JSON"),
    ("identical-conversations", {"chosen": CONV_C, "rejected": CONV_C}, "chosen is identical to rejected"),
]


@pytest.mark.parametrize(("row", "fragment"), [pytest.param(r, f, id=i) for i, r, f in ROWS])
def test_malformed_row(row, fragment):
    err = expect(lambda: normalize_row(7, row), PreferenceDataError, fragment)
    assert str(err).startswith("preference row 7: ")


@pytest.mark.parametrize("row", [GOOD, {"chosen": CONV_C, "rejected": CONV_R},
                                 {"prompt": [CONV_C[0]], "chosen": [CONV_C[1]], "rejected": "Paris"},
                                 {**GOOD, "extra": "ignored"}, {"prompt": "é ünïcode ✓", "chosen": "日本", "rejected": "x"}],
                         ids=["strings", "conversations", "messages", "extra-key", "unicode"])
def test_valid_row(row):
    assert normalize_row(0, row).chosen


# ------------------------------------------------------------------------------ files and encodings
def write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def dangling(tmp_path, name):
    """A link to a folder that does not exist (moved, or on a mount that is gone)."""
    path = tmp_path / name
    path.symlink_to(tmp_path / "gone" / name)
    return path


GOOD_LINE = json.dumps(GOOD)
FILES = [
    ("jsonl-missing", "none.jsonl", None, FileNotFoundError, "does not exist"),
    ("json-missing", "none.json", None, FileNotFoundError, "does not exist"),
    ("parquet-missing", "none.parquet", None, FileNotFoundError, "does not exist"),
    ("csv", "d.csv", "a,b\n", ValueError, "unsupported format '.csv'"),
    ("txt", "d.txt", GOOD_LINE, ValueError, "unsupported format '.txt'"),
    ("json-empty", "d.json", "", ValueError, "is empty"),
    ("json-blank", "d.json", "  \n", ValueError, "is empty"),
    ("json-broken", "d.json", "[{", ValueError, "is not valid JSON (line 1"),
    ("json-object", "d.json", GOOD_LINE, ValueError, "must hold a JSON list of rows; got a dict"),
    ("json-number", "d.json", "3", ValueError, "must hold a JSON list of rows; got a int"),
    ("json-latin1", "d.json", json.dumps([GOOD]).replace("Paris", "Par\xeds").encode("latin-1"), ValueError,
     "is not UTF-8 text"),
    ("jsonl-utf16", "d.jsonl", (GOOD_LINE + "\n").encode("utf-16"), ValueError, "is not UTF-8 text"),
    ("jsonl-binary", "d.jsonl", b"\x00\xff\xfe\x00", ValueError, "is not UTF-8 text"),
    ("jsonl-bad-line", "d.jsonl", GOOD_LINE + "\n{oops\n", PreferenceDataError, "line 2 of"),
    ("jsonl-truncated-line", "d.jsonl", GOOD_LINE + "\n" + GOOD_LINE[:-5], PreferenceDataError, "(line 2 of"),
    ("jsonl-array-line", "d.jsonl", "[1, 2]\n", PreferenceDataError, "must be a JSON object, got list"),
    ("jsonl-missing-key", "d.jsonl", GOOD_LINE + '\n{"prompt": "a", "chosen": "b"}\n', PreferenceDataError,
     "d.jsonl): missing key 'rejected'"),
    ("directory-as-file", "dir.jsonl", "DIR", ValueError, "is a folder; give a .json, .jsonl, .ndjson, .parquet file"),
    ("directory", "pairs", "DIR", ValueError, "is a folder"),  # not handed to datasets to read all under it
    ("json-empty-list", "d.json", "[]", ValueError, "holds no preference row"),
    ("jsonl-blank", "d.jsonl", "\n  \n", ValueError, "holds no preference row"),
]


@pytest.mark.parametrize(("name", "content", "exc", "fragment"),
                         [pytest.param(n, c, e, f, id=i) for i, n, c, e, f in FILES])
def test_bad_data_file(tmp_path, name, content, exc, fragment):
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        write(tmp_path, name, content)
    expect(lambda: check_rows(str(path)), exc, fragment)


VALID_FILES = [
    ("jsonl", "d.jsonl", GOOD_LINE + "\n", 1),
    ("jsonl-blank-lines", "d.jsonl", "\n" + GOOD_LINE + "\n\n  \n" + GOOD_LINE, 2),
    ("jsonl-crlf", "d.jsonl", GOOD_LINE + "\r\n" + GOOD_LINE + "\r\n", 2),
    ("jsonl-utf8-bom", "d.jsonl", ("\ufeff" + GOOD_LINE + "\n").encode("utf-8"), 1),
    ("json", "d.json", json.dumps([GOOD, GOOD]), 2),
    ("json-unicode", "d.json", json.dumps([{**GOOD, "chosen": "Pärïs ✓"}], ensure_ascii=False).encode("utf-8"), 1),
]


@pytest.mark.parametrize(("name", "content", "count"), [pytest.param(n, c, k, id=i) for i, n, c, k in VALID_FILES])
def test_valid_data_file(tmp_path, name, content, count):
    assert len(check_rows(str(write(tmp_path, name, content)))) == count


def test_parquet_reads_and_checks(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([GOOD, {"prompt": "a", "chosen": "b", "rejected": "b"}]).to_parquet(str(path))
    expect(lambda: check_rows(str(path)), PreferenceDataError, "preference row 1: chosen is identical")
    assert len(check_rows(str(path), skip_invalid=True)) == 2


def test_skip_invalid_counts_a_bad_jsonl_line(tmp_path):
    path = write(tmp_path, "d.jsonl", GOOD_LINE + "\nnot json\n")
    rows = check_rows(str(path), skip_invalid=True)
    features, summary = tokenize_rows(rows, tiny_chat_tokenizer(), skip_invalid=True, use_chat_template=False)
    assert summary.kept == 1 and summary.rows == 2 and sum(summary.skipped.values()) == 1


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


TOKENIZE = [
    ("max_length-1", {"max_length": 1}, ValueError, "max_length must be an integer >= 2"),
    ("max_length-0", {"max_length": 0}, ValueError, "max_length must be an integer >= 2"),
    ("max_prompt_length-0", {"max_prompt_length": 0}, ValueError, "max_prompt_length must be an integer >= 1"),
    ("max_length-float", {"max_length": 64.0}, TypeError, "max_length must be an int"),
    ("max_prompt_length-str", {"max_prompt_length": "8"}, TypeError, "max_prompt_length must be an int"),
    ("max_length-bool", {"max_length": True}, TypeError, "max_length must be an int"),
    ("max_prompt_length-whole", {"max_length": 64, "max_prompt_length": 64}, ValueError,
     "max_prompt_length (64) must be below max_length (64)"),
    ("skip_invalid-str", {"skip_invalid": "no"}, TypeError, "skip_invalid must be True or False; got 'no'"),
    ("skip_invalid-int", {"skip_invalid": 0}, TypeError, "skip_invalid must be True or False; got 0"),
]


@pytest.mark.parametrize(("options", "exc", "fragment"), [pytest.param(o, e, f, id=i) for i, o, e, f in TOKENIZE])
def test_bad_tokenize_options(tokenizer, options, exc, fragment):
    expect(lambda: tokenize_rows([GOOD], tokenizer, use_chat_template=False, **options), exc, fragment)


def test_use_chat_template_is_a_bool_or_none(tokenizer):
    expect(lambda: tokenize_rows([GOOD], tokenizer, use_chat_template="no"), TypeError,
           "use_chat_template must be True or False (or None); got 'no'")
    expect(lambda: check_rows([GOOD], skip_invalid="yes"), TypeError, "skip_invalid must be True or False")


@pytest.mark.parametrize("dtype", ["bf16", "int8", torch.int64, 16])
def test_a_base_dtype_that_is_not_one_is_refused_by_name(tmp_path, dtype):
    save_tiny_base(tmp_path / "base")
    expect(lambda: QAdapterModel.from_base(str(tmp_path / "base"), torch_dtype=dtype), ValueError,
           "torch_dtype must be a floating torch.dtype or its name")
    assert QAdapterModel.from_base(str(tmp_path / "base"), torch_dtype="bfloat16").base_model.dtype == torch.bfloat16


def test_no_usable_pair_after_skipping(tokenizer):
    expect(lambda: tokenize_rows([{"prompt": "a"}], tokenizer, skip_invalid=True), ValueError,
           "no usable preference pair")


def test_no_rows_at_all(tokenizer):
    expect(lambda: tokenize_rows([], tokenizer), ValueError, "no usable preference pair")


def test_messages_need_a_chat_template(tokenizer):
    expect(lambda: tokenize_rows([{"chosen": CONV_C, "rejected": CONV_R}], tokenizer, use_chat_template=False),
           ValueError, "chat template")


COLLATOR = [
    ("pad-none", {"pad_token_id": None}, TypeError, "pad_token_id must be an int"),
    ("pad-float", {"pad_token_id": 0.0}, TypeError, "pad_token_id must be an int"),
    ("multiple-0", {"pad_token_id": 0, "pad_to_multiple_of": 0}, ValueError, "pad_to_multiple_of must be an integer >= 1"),
    ("multiple-negative", {"pad_token_id": 0, "pad_to_multiple_of": -8}, ValueError, "pad_to_multiple_of"),
]


@pytest.mark.parametrize(("options", "exc", "fragment"), [pytest.param(o, e, f, id=i) for i, o, e, f in COLLATOR])
def test_bad_collator_option(options, exc, fragment):
    from qadapter.library.data import PreferenceCollator

    expect(lambda: PreferenceCollator(**options), exc, fragment)


def test_collator_refuses_an_empty_batch():
    from qadapter.library.data import PreferenceCollator

    expect(lambda: PreferenceCollator(0)([]), ValueError, "no pairs")


def test_collator_pads_to_a_multiple():
    from qadapter.library.data import PreferenceCollator

    pair = {"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1], "chosen_labels": [-100, 2, 3],
            "rejected_labels": [-100]}
    batch = PreferenceCollator(0, pad_to_multiple_of=8)([pair])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"][1, 1:].eq(-100).all()


def test_read_rows_passes_lists_through():
    assert read_rows([GOOD]) == [GOOD]


def test_read_rows_takes_any_iterable_of_rows_and_a_dataset_dicts_split():
    """A tuple or a generator of rows is rows, not a file or hub name spelled by its repr."""
    import datasets

    assert read_rows((GOOD, GOOD)) == [GOOD, GOOD]
    assert read_rows(row for row in [GOOD]) == [GOOD]
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list([GOOD]), test=datasets.Dataset.from_list([GOOD] * 2))
    assert read_rows(splits) == [GOOD] and len(read_rows(splits, split="test")) == 2
    with pytest.raises(ValueError, match="data has no split 'validation'; its splits: 'train', 'test'"):
        read_rows(splits, split="validation")


@pytest.mark.parametrize(("source", "fragment"), [
    pytest.param(GOOD, "got a dict", id="one-row"),
    pytest.param(3, "got int", id="int"),
    pytest.param(b"d.jsonl", "got bytes", id="bytes"),
])
def test_read_rows_refuses_what_is_no_rows_naming_what_it_takes(source, fragment):
    with pytest.raises(TypeError, match=f"data must be a list of rows.*{fragment}"):
        read_rows(source)


# ------------------------------------------------------------------------------ CLI arguments
DATA = ["--data", "d.jsonl", "--output", "x"]
GEN = ["generate", "--adapter", "a", "--prompt", "hi"]
CLI = [
    ("no-verb", [], "usage: qadapter"),
    ("unknown-verb", ["fly"], "invalid choice: 'fly'"),
    ("demo-steps-0", ["demo", "--steps", "0"], "--steps"),
    ("demo-steps-word", ["demo", "--steps", "many"], "--steps"),
    ("demo-unknown", ["demo", "--nonsense"], "unrecognized"),
    ("compare-unknown", ["compare", "--nonsense"], "unrecognized"),
    ("train-no-data", ["train", "--output", "x"], "--data"),
    ("train-no-output", ["train", "--data", "d.jsonl"], "--output"),
    ("train-unknown", ["train", *DATA, "--no_such_option", "1"], "--no_such_option"),
    ("train-output_dir", ["train", *DATA, "--output_dir", "elsewhere"], "--output_dir is --output's"),
    ("train-learning_rate-word", ["train", *DATA, "--learning_rate", "abc"],
     "qadapter train: error: argument --learning_rate/--learning-rate: invalid float value: 'abc'"),
    ("train-backend", ["train", *DATA, "--backend", "foo"], "--backend: invalid choice: 'foo'"),
    ("train-reward_norm", ["train", *DATA, "--reward_norm", "avg"], "--reward_norm"),
    ("train-value_at", ["train", *DATA, "--value_at", "later"], "--value_at"),
    ("train-alpha_tilde-negative", ["train", *DATA, "--alpha_tilde", "-1"], "alpha_tilde must be > 0"),
    ("train-alpha_tilde-word", ["train", *DATA, "--alpha_tilde", "hot"], "--alpha_tilde"),
    ("train-alpha_0-negative", ["train", *DATA, "--alpha_0", "-0.5"], "alpha_0"),
    ("train-beta-nan", ["train", *DATA, "--beta", "nan"], "beta"),
    ("train-gamma-inf", ["train", *DATA, "--gamma", "inf"], "gamma"),
    ("train-chunk_size-negative", ["train", *DATA, "--chunk_size", "-3"], "chunk_size"),
    ("train-chunk_size-float", ["train", *DATA, "--chunk_size", "2.5"], "--chunk_size"),
    ("train-curve-steps-0", ["train", *DATA, "--curve-steps", "0"], "--curve-steps"),
    ("train-curve-steps-word", ["train", *DATA, "--curve-steps", "often"], "--curve-steps"),
    ("train-learning_rate-word", ["train", *DATA, "--learning_rate", "fast"], "--learning_rate"),
    ("train-positional", ["train", *DATA, "stray"], "['stray']"),
    ("gen-no-adapter", ["generate", "--prompt", "hi"], "--adapter"),
    ("gen-no-prompt", ["generate", "--adapter", "a"], "--prompt"),
    ("gen-top-p-above-1", [*GEN, "--top-p", "1.5"], "--top-p"),
    ("gen-top-p-0", [*GEN, "--top-p", "0"], "--top-p: must be in (0, 1]"),
    ("gen-top-p-word", [*GEN, "--top-p", "most"], "--top-p"),
    ("gen-top-k-negative", [*GEN, "--top-k", "-5"], "--top-k: must be an integer >= 0"),
    ("gen-top-k-float", [*GEN, "--top-k", "2.5"], "--top-k"),
    ("gen-temperature-negative", [*GEN, "--temperature", "-1"], "--temperature: must be > 0"),
    ("gen-temperature-0", [*GEN, "--temperature", "0"], "--temperature: must be > 0"),
    ("gen-temperature-nan", [*GEN, "--temperature", "nan"], "--temperature"),
    ("gen-temperature-inf", [*GEN, "--temperature", "inf"], "--temperature: must be > 0 and finite"),
    ("gen-max-new-tokens-0", [*GEN, "--max-new-tokens", "0"], "--max-new-tokens"),
    ("gen-max-new-tokens-word", [*GEN, "--max-new-tokens", "lots"], "--max-new-tokens"),
    ("gen-seed-word", [*GEN, "--seed", "lucky"], "--seed"),
    ("gen-seed-huge", [*GEN, "--sample", "--seed", str(2**70)], "--seed: must be an integer in [0, 2**64 - 1]"),
    ("gen-seed-negative", [*GEN, "--sample", "--seed", "-1"], "--seed: must be an integer in [0, 2**64 - 1]"),
    ("gen-stop-empty", [*GEN, "--stop", ""], "--stop: must not be empty"),
    ("gen-min-p-above-1", [*GEN, "--sample", "--min-p", "1.5"], "--min-p: must be in [0, 1]"),
    ("gen-unknown", [*GEN, "--beam", "4"], "unrecognized arguments: --beam 4"),
    ("gen-num-beams-0", [*GEN, "--num-beams", "0"], "--num-beams"),
    ("eval-no-data", ["eval", "--adapter", "a"], "--data"),
    ("eval-no-adapter", ["eval", "--data", "d.jsonl"], "--adapter"),
    ("eval-max-length-0", ["eval", "--adapter", "a", "--data", "d", "--max-length", "0"], "--max-length"),
    ("eval-max-prompt-length-negative", ["eval", "--adapter", "a", "--data", "d", "--max-prompt-length", "-1"],
     "--max-prompt-length"),
    ("eval-max-prompt-length-whole", ["eval", "--adapter", "a", "--data", "d", "--max-length", "64",
                                      "--max-prompt-length", "64"],
     "--max-prompt-length (64) must be below --max-length (64)"),
    ("check-max-prompt-length-long", ["check", "a", "--data", "d", "--max-length", "128", "--max-prompt-length",
                                      "200"], "--max-prompt-length (200) must be below --max-length (128)"),
    ("eval-unknown", ["eval", "--adapter", "a", "--data", "d", "--alpha_0", "1"], "unrecognized"),
    ("lm-eval-max_batch_size-0", ["lm-eval", "--max_batch_size", "0"], "--max_batch_size"),
    ("lm-eval-num_fewshot-word", ["lm-eval", "--num_fewshot", "few"], "--num_fewshot"),
    ("lm-eval-limit-word", ["lm-eval", "--limit", "some"], "--limit"),
    ("lm-eval-cache_requests", ["lm-eval", "--cache_requests", "maybe"], "--cache_requests"),
    ("lm-eval-fewshot_as_multiturn", ["lm-eval", "--fewshot_as_multiturn", "perhaps"], "--fewshot_as_multiturn: must be true or false"),
    ("lm-eval-unknown", ["lm-eval", "--nonsense"], "unrecognized"),
    # Trainer's own failures come after the model loads, or never (an untrained adapter saved).
    ("train-gradient_accumulation_steps-0", ["train", *DATA, "--gradient_accumulation_steps", "0"],
     "--gradient_accumulation_steps must be an integer >= 1; got 0"),
    ("train-batch-size-0", ["train", *DATA, "--per_device_train_batch_size", "0"],
     "--per_device_train_batch_size must be an integer >= 1"),
    ("train-learning_rate-negative", ["train", *DATA, "--learning_rate", "-1"], "--learning_rate must be a number >= 0"),
    ("train-max_prompt_length-whole", ["train", *DATA, "--max_length", "64", "--max_prompt_length", "100"],
     "max_prompt_length (100) must be below max_length (64)"),
    ("train-lora_alpha-0", ["train", *DATA, "--lora_alpha", "0"], "--lora_alpha must be > 0"),
    ("train-lora_alpha-negative", ["train", *DATA, "--lora_alpha", "-4"], "--lora_alpha must be > 0"),
    ("train-seed-negative", ["train", *DATA, "--seed", "-1"], "--seed must be an integer in [0, 2**32 - 1]"),
    ("train-seed-too-large", ["train", *DATA, "--seed", str(2**32)], "--seed must be an integer in [0, 2**32 - 1]"),
    ("train-max_steps-0", ["train", *DATA, "--max_steps", "0"], "--max_steps must be -1"),
    ("train-epochs-0", ["train", *DATA, "--num_train_epochs", "0"], "--num_train_epochs must be > 0"),
    ("serve-port-too-large", ["serve", "--port", "70000"], "--port: must be a TCP port in 1..65535; got 70000"),
    ("serve-port-0", ["serve", "--port", "0"], "--port: must be a TCP port"),
    ("gen-max-new-tokens-type-named", [*GEN, "--max-new-tokens", "abc"],
     "--max-new-tokens: invalid positive integer value: 'abc'"),
    ("gen-top-p-type-named", [*GEN, "--top-p", "most"], "--top-p: invalid probability value: 'most'"),
    ("gen-temperature-without-sample", [*GEN, "--temperature", "0.7"], "--temperature applies only with --sample"),
    ("gen-seed-without-sample", [*GEN, "--seed", "3"], "--seed applies only with --sample"),
    ("gen-sampling-without-sample", [*GEN, "--top-k", "5", "--top-p", "0.9", "--min-p", "0.1"],
     "--top-k, --top-p, --min-p apply only with --sample"),
    ("gen-compute-dtype-8bit", [*GEN, "--load-in-8bit", "--compute-dtype", "float16"],
     "--compute-dtype applies with --load-in-4bit"),
    ("plan-compute-dtype-8bit", ["plan", "--load-in-8bit", "--compute-dtype", "float16"],
     "--compute-dtype applies with --load-in-4bit"),
    ("compare-alpha-0-negative", ["compare", "--alpha-0", "-1"], "--alpha-0: must be >= 0"),
    ("compare-heldout-without-data", ["compare", "--heldout", "5"], "--heldout applies with --data"),
    ("compare-skip-invalid-without-data", ["compare", "--skip-invalid"], "--skip-invalid applies with --data"),
    ("compare-quick-and-budgets", ["compare", "--quick", "--budgets", "10"], "--quick runs 2 steps"),
]


@pytest.mark.parametrize(("argv", "fragment"), [pytest.param(a, f, id=i) for i, a, f in CLI])
def test_cli_bad_argument_exits_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err


CLI_FILES = [
    ("gen-adapter-missing", lambda p: [*GEN[:2], str(p / "none"), "--prompt", "hi"], "no such folder"),
    ("eval-adapter-missing", lambda p: ["eval", "--adapter", str(p / "none"),
                                        "--data", str(write(p, "d.jsonl", GOOD_LINE))], "no such folder"),
    ("train-data-missing", lambda p: ["train", "--data", str(p / "none.jsonl"), "--output", str(p / "o")],
     "does not exist"),
    ("train-data-csv", lambda p: ["train", "--data", str(write(p, "d.csv", "a")), "--output", str(p / "o")],
     "unsupported format"),
    ("train-data-bad-row", lambda p: ["train", "--data", str(write(p, "d.jsonl", '{"prompt": "a"}\n')),
                                      "--output", str(p / "o")], "preference row 0 (line 1 of"),
    ("train-output-is-file", lambda p: ["train", "--data", str(write(p, "d.jsonl", GOOD_LINE)),
                                        "--output", str(write(p, "out", "x"))], "out"),
    ("train-eval-data-missing", lambda p: ["train", "--data", str(write(p, "d.jsonl", GOOD_LINE)),
                                           "--eval-data", str(p / "none.jsonl"), "--output", str(p / "o")],
     "does not exist"),
    ("train-curve-without-eval", lambda p: ["train", "--data", str(write(p, "d.jsonl", GOOD_LINE)),
                                            "--curve-steps", "2", "--output", str(p / "o")], "--eval-data"),
    ("demo-output-is-file", lambda p: ["demo", "--output", str(write(p, "out", "x"))], "is a file, not a directory"),
    ("demo-output-under-file", lambda p: ["demo", "--output", str(write(p, "out", "x") / "sub")],
     "is a file, not a directory"),
    ("compare-output-is-file", lambda p: ["compare", "--output", str(write(p, "out", "x"))], "is a file"),
    ("compare-data-bad-row", lambda p: ["compare", "--methods", "qadapter", "--output", str(p / "o"), "--data",
                                        str(write(p, "d.jsonl", GOOD_LINE + '\n{"prompt": "a", "chosen": "b"}\n'))],
     "d.jsonl): missing key 'rejected'"),
    ("check-output-is-file", lambda p: ["check", str(p / "a"), "--data", "d.jsonl", "--output", str(write(p, "out", "x"))],
     "is a file, not a directory"),
    ("train-output-dangling-link", lambda p: ["train", "--data", str(write(p, "d.jsonl", GOOD_LINE)),
                                              "--output", str(dangling(p, "out"))], "out is a link to"),
    ("check-output-dangling-link", lambda p: ["check", str(p / "a"), "--data", "d.jsonl", "--output",
                                              str(dangling(p, "out"))], "which does not exist"),
    ("check-thresholds-missing", lambda p: ["check", str(p / "a"), "--data", "d.jsonl", "--thresholds",
                                            str(p / "none.json")], "--thresholds"),
    ("check-baseline-missing", lambda p: ["check", str(p / "a"), "--data", "d.jsonl", "--baseline",
                                          str(p / "none.json")], "--baseline"),
]


@pytest.mark.parametrize(("argv", "fragment"), [pytest.param(a, f, id=i) for i, a, f in CLI_FILES])
def test_cli_bad_file_exits_2_in_one_line(tmp_path, argv, fragment, capsys):
    args = argv(tmp_path)
    args = [a if a != "d.jsonl" else str(tmp_path / "d.jsonl") for a in args]
    with pytest.raises(SystemExit) as info:
        main(args + (["--model", str(tmp_path / "no-model")] if args[0] == "train" else []))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert fragment in err, err


def test_train_output_on_its_own_stack_exits_2_before_loading(saved, tmp_path, capsys):
    """Training --on an adapter with --output that adapter would replace it: refused before the model
    loads (the --model given does not exist), not after training."""
    root, _ = saved
    data = write(tmp_path, "d.jsonl", GOOD_LINE)
    with pytest.raises(SystemExit) as info:
        main(["train", "--on", str(root / "adapter"), "--output", str(root / "adapter"), "--data", str(data),
              "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "holds an adapter the new one is trained on" in err, err


def test_plan_unknown_target_module_exits_2(tmp_path, capsys):
    """plan takes the LoRA target modules train takes: a name no layer has is refused, not planned as 0."""
    tiny_causal_lm("llama").config.save_pretrained(tmp_path / "base")
    with pytest.raises(SystemExit) as info:
        main(["plan", "--model", str(tmp_path / "base"), "--lora-target-modules", "q_proj", "foo_proj"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--lora-target-modules: foo_proj is not a linear layer" in err, err


# ------------------------------------------------------------------------------ saving and loading
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base with its tokenizer in a directory, a second, different base, and a perturbed
    adapter saved for the first."""
    root = tmp_path_factory.mktemp("bad_adapters")
    save_tiny_base(root / "base")
    other = tiny_causal_lm("llama", vocab=len(tiny_chat_tokenizer()), seed=5)
    other.save_pretrained(root / "other")
    tiny_chat_tokenizer().save_pretrained(root / "other")
    model = QAdapterModel.from_base(str(root / "base"), alpha_tilde=0.7, alpha_0=0.3)
    perturb_adapter(model, scale=0.2)
    model.save_pretrained(root / "adapter")
    return root, model


def broken_copy(root, tmp_path, damage):
    target = tmp_path / "adapter"
    shutil.copytree(root / "adapter", target)
    damage(target)
    return target


def edit_config(change, name: str = CONFIG_NAME):
    def damage(path):
        config = json.loads((path / name).read_text())
        change(config)
        (path / name).write_text(json.dumps(config))
    return damage


def edit_peft_config(**options):
    """PEFT's adapter_config.json with ``options``, as a foreign or edited adapter may have it."""
    return edit_config(lambda c: c.update(options), "adapter_config.json")


def rename_tensor(path):
    from safetensors.torch import load_file, save_file

    state = load_file(path / WEIGHTS_NAME)
    key = sorted(state)[0]
    state[key.replace("lora_A", "lora_X")] = state.pop(key)
    save_file(state, path / WEIGHTS_NAME)


def extra_tensor(path):
    from safetensors.torch import load_file, save_file

    state = load_file(path / WEIGHTS_NAME)
    state["base_model.model.extra.lora_A.weight"] = torch.zeros(2, 2)
    save_file(state, path / WEIGHTS_NAME)


def drop_tensor(path):
    from safetensors.torch import load_file, save_file

    state = load_file(path / WEIGHTS_NAME)
    state.pop(sorted(state)[0])
    save_file(state, path / WEIGHTS_NAME)


def reshape_tensor(path):
    from safetensors.torch import load_file, save_file

    state = load_file(path / WEIGHTS_NAME)
    key = sorted(state)[0]
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, path / WEIGHTS_NAME)


ADAPTERS = [
    ("config-missing", lambda p: (p / CONFIG_NAME).unlink(), "is not a saved Q-Adapter"),
    ("weights-missing", lambda p: (p / WEIGHTS_NAME).unlink(), "incomplete adapter"),
    ("peft-config-missing", lambda p: (p / "adapter_config.json").unlink(), "cannot be loaded"),
    ("config-not-json", lambda p: (p / CONFIG_NAME).write_text("{oops"), "is corrupted"),
    ("config-not-utf8", lambda p: (p / CONFIG_NAME).write_bytes(b"\xff\xfe{}"), "is corrupted"),
    ("config-empty", lambda p: (p / CONFIG_NAME).write_text(""), "is corrupted"),
    ("config-lacks-fingerprint", edit_config(lambda c: c.pop("base_fingerprint")), "lacks ['base_fingerprint']"),
    ("config-lacks-loss", edit_config(lambda c: c.pop("loss")), "lacks ['loss']"),
    ("config-future-format", edit_config(lambda c: c.update(format_version=999)), "format_version 999"),
    ("config-loss-list", edit_config(lambda c: c.update(loss=[1])), "'loss' must be an object"),
    ("config-bad-alpha", edit_config(lambda c: c["loss"].update(alpha_tilde=-1)), "invalid option: alpha_tilde"),
    ("config-bad-backend", edit_config(lambda c: c["loss"].update(backend="warp")), "invalid option"),
    ("config-bad-chunk", edit_config(lambda c: c["loss"].update(chunk_size=0)), "chunk_size"),
    ("config-bad-value_at", edit_config(lambda c: c["loss"].update(value_at="never")), "value_at"),
    ("config-other-base", edit_config(lambda c: c.update(base_fingerprint="0" * 16)), "fingerprint"),
    ("weights-truncated", lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:40]),
     "cannot be loaded (corrupted or incomplete?)"),
    ("weights-garbage", lambda p: (p / WEIGHTS_NAME).write_bytes(b"\x00" * 64), "cannot be loaded"),
    ("weights-renamed-tensor", rename_tensor, "does not match its adapter config"),
    ("weights-extra-tensor", extra_tensor, "unexpected ['base_model.model.extra.lora_A.weight']"),
    ("weights-missing-tensor", drop_tensor, "does not match its adapter config: missing"),
    ("weights-other-rank", reshape_tensor, "cannot be loaded"),
    # PEFT options under which the frozen model would not be the base: refused before PEFT applies them.
    ("peft-config-base-bias", edit_peft_config(bias="all"), "bias='all' trains the base model's own biases"),
    ("peft-config-pissa", edit_peft_config(init_lora_weights="pissa"), "rewrites the base model's weights"),
    ("peft-config-modules-to-save", edit_peft_config(modules_to_save=["embed_tokens"]), "modules_to_save"),
]


@pytest.mark.parametrize(("damage", "fragment"), [pytest.param(d, f, id=i) for i, d, f in ADAPTERS])
def test_broken_adapter_is_refused(saved, tmp_path, damage, fragment):
    root, _ = saved
    path = broken_copy(root, tmp_path, damage)
    expect(lambda: QAdapterModel.from_pretrained(path, str(root / "base")), AdapterLoadError, fragment)


# load_adapter_weights (resume, best-model loading) words the same damage its own way
RELOAD = {"config-other-base": "trained on another base model", "weights-truncated": f"{WEIGHTS_NAME} cannot be read",
          "weights-garbage": f"{WEIGHTS_NAME} cannot be read", "weights-renamed-tensor": "does not match",
          "weights-extra-tensor": "does not match", "weights-missing-tensor": "does not match",
          "weights-other-rank": "cannot load adapter weights", "config-missing": "is not a saved Q-Adapter",
          "weights-missing": "incomplete adapter", "config-bad-alpha": "invalid option"}


@pytest.mark.parametrize(("damage", "fragment"), [pytest.param(d, RELOAD[i], id=i) for i, d, _ in ADAPTERS
                                                  if i in RELOAD])
def test_broken_adapter_refused_by_load_adapter_weights(saved, tmp_path, damage, fragment):
    root, model = saved
    path = broken_copy(root, tmp_path, damage)
    expect(lambda: model.load_adapter_weights(path), AdapterLoadError, fragment)


def test_a_checkpoint_of_other_lora_options_is_refused_by_load_adapter_weights(saved, tmp_path):
    """rsLoRA scales by alpha / sqrt(r), not alpha / r: the same tensors resumed under the other
    scale would decode another policy, so a checkpoint of other PEFT scale options is refused."""
    root, model = saved
    path = broken_copy(root, tmp_path, edit_peft_config(use_rslora=True))
    expect(lambda: model.load_adapter_weights(path), AdapterLoadError, "use_rslora True")


def test_adapter_on_another_base_is_refused(saved):
    root, _ = saved
    expect(lambda: QAdapterModel.from_pretrained(root / "adapter", str(root / "other")), AdapterLoadError,
           "fingerprint")


def test_adapter_extra_file_is_fine(saved, tmp_path):
    root, _ = saved
    path = broken_copy(root, tmp_path, lambda p: (p / "notes.txt").write_text("mine"))
    assert QAdapterModel.from_pretrained(path, str(root / "base")).loss.alpha_0 == 0.3


def test_adapter_path_is_a_file(saved, tmp_path):
    expect(lambda: QAdapterModel.from_pretrained(write(tmp_path, "file", "x")), AdapterLoadError,
           "is not a saved Q-Adapter")


SAVES = [
    ("onto-a-file", lambda p: write(p, "f", "x"), {}, (FileExistsError, NotADirectoryError, ValueError), "f"),
    ("into-foreign-dir", lambda p: (p / "d").mkdir() or write(p / "d", "mine.txt", "x").parent, {},
     (FileExistsError, ValueError), "overwrite"),
]


@pytest.mark.parametrize(("where", "options", "exc", "fragment"), [pytest.param(w, o, e, f, id=i) for i, w, o, e, f in SAVES])
def test_bad_save_target(saved, tmp_path, where, options, exc, fragment):
    _, model = saved
    expect(lambda: model.save_pretrained(where(tmp_path), **options), exc, fragment)


def test_save_into_foreign_dir_with_overwrite_keeps_its_files(saved, tmp_path):
    _, model = saved
    (tmp_path / "d").mkdir()
    write(tmp_path / "d", "mine.txt", "x")
    model.save_pretrained(tmp_path / "d", overwrite=True)
    assert (tmp_path / "d" / "mine.txt").read_text() == "x" and (tmp_path / "d" / CONFIG_NAME).is_file()


# ------------------------------------------------------------------------------ generation options
PROMPT = torch.tensor([[5, 6, 7]])
GENERATE = [
    ("ids-list", {"input_ids": [[1, 2]]}, ValueError, "input_ids must be an integer tensor [B, T]"),
    ("ids-float", {"input_ids": PROMPT.float()}, ValueError, "input_ids must be an integer tensor"),
    ("ids-1d", {"input_ids": PROMPT[0]}, ValueError, "input_ids must be an integer tensor [B, T]"),
    ("ids-empty", {"input_ids": PROMPT[:, :0]}, ValueError, "at least one prompt token"),
    ("mask-shape", {"attention_mask": torch.ones(1, 2, dtype=torch.long)}, ValueError, "attention_mask must have"),
    ("right-padded", {"attention_mask": torch.tensor([[1, 1, 0]])}, ValueError, "left-padded"),
    ("mask-list", {"attention_mask": [[1, 1, 1]]}, TypeError, "attention_mask (the second argument) must be a tensor"),
    # transformers' order, generate(inputs, generation_config): named
    ("mask-generation-config", {"attention_mask": GenerationConfig(max_new_tokens=2)},
     TypeError, "got GenerationConfig (pass it as generation_config=...)"),
    # transformers' own check, which names the argument
    ("max_new_tokens-negative", {"max_new_tokens": -1}, ValueError, "max_new_tokens` must be greater than 0"),
    ("max_new_tokens-0", {"max_new_tokens": 0}, ValueError, "max_new_tokens` must be greater than 0"),
    ("max_new_tokens-float", {"max_new_tokens": 2.5}, (TypeError, ValueError), "max_new_tokens must be"),
    ("temperature-0-sampling", {"do_sample": True, "temperature": 0.0}, ValueError, "temperature must be > 0"),
    ("temperature-negative-sampling", {"do_sample": True, "temperature": -1.0}, ValueError, "temperature"),
    ("temperature-nan-sampling", {"do_sample": True, "temperature": float("nan")}, ValueError, "temperature"),
    ("top_k-negative", {"do_sample": True, "top_k": -3}, ValueError, "top_k must be"),
    ("top_k-float", {"do_sample": True, "top_k": 2.5}, (TypeError, ValueError), "top_k must be"),
    ("top_p-0", {"do_sample": True, "top_p": 0.0}, ValueError, "top_p must be"),
    ("top_p-above-1", {"do_sample": True, "top_p": 1.5}, ValueError, "top_p must be"),
    ("top_p-nan", {"do_sample": True, "top_p": float("nan")}, ValueError, "top_p must be"),
    ("eos-str", {"eos_token_id": "2"}, ValueError, "eos_token_id must be a token id"),
    ("eos-float", {"eos_token_id": 2.0}, ValueError, "eos_token_id must be a token id"),
    ("eos-list-of-str", {"eos_token_id": ["2"]}, ValueError, "eos_token_id must be a token id"),
    ("pad-negative", {"pad_token_id": -5}, ValueError, "pad_token_id must be a token id in [0,"),
    ("pad-beyond-vocab", {"pad_token_id": 10**6}, ValueError, "pad_token_id must be a token id in [0,"),
    ("pad-float", {"pad_token_id": 1.0}, ValueError, "pad_token_id must be a token id"),
    ("min_p-above-1", {"do_sample": True, "min_p": 1.5}, ValueError, "min_p must be in [0, 1]"),
    ("repetition_penalty-0", {"repetition_penalty": 0.0}, ValueError, "repetition_penalty must be > 0"),
    ("num_return_sequences-0", {"num_return_sequences": 0}, ValueError,
     "num_return_sequences must be an integer >= 1"),
    ("num_beams-0", {"num_beams": 0}, ValueError, "num_beams must be an integer >= 1"),
    ("eos-beyond-vocab", {"eos_token_id": 10**6}, ValueError, "eos_token_id must be a token id (int) in [0,"),
]
VALID_GENERATE = [
    ("greedy", {}, 3 + 2),
    ("sample-top-k-1", {"do_sample": True, "top_k": 1}, 3 + 2),
    ("sample-top-p-1", {"do_sample": True, "top_p": 1.0, "temperature": 0.5}, 3 + 2),
    ("greedy-ignores-temperature", {"temperature": 0.0}, 3 + 2),
    ("int32-ids", {"input_ids": PROMPT.int()}, 3 + 2),
    ("eos-list", {"eos_token_id": [2, 3]}, None),
    ("eos-tuple", {"eos_token_id": (2,)}, None),
    ("pad-given", {"pad_token_id": 0}, 3 + 2),
    ("numpy-counts", {"max_new_tokens": np.int64(2), "num_beams": np.int64(1), "do_sample": True,
                      "top_k": np.int32(3)}, 3 + 2),  # transformers alone refuses a numpy top_k
]


@pytest.fixture(scope="module")
def chat_model():
    tokenizer = tiny_chat_tokenizer()
    model = QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer=tokenizer)
    perturb_adapter(model, scale=0.2)
    return model


def generate(model, **kw):
    kw.setdefault("input_ids", PROMPT)
    kw.setdefault("max_new_tokens", 2)
    kw.setdefault("eos_token_id", [])
    return model.generate(**kw)


@pytest.mark.parametrize(("options", "exc", "fragment"), [pytest.param(o, e, f, id=i) for i, o, e, f in GENERATE])
def test_bad_generation_option(chat_model, options, exc, fragment):
    expect(lambda: generate(chat_model, **options), exc, fragment)


@pytest.mark.parametrize(("options", "length"), [pytest.param(o, n, id=i) for i, o, n in VALID_GENERATE])
def test_valid_generation_option(chat_model, options, length):
    torch.manual_seed(0)
    out = generate(chat_model, **options)
    assert out.shape == (1, length) if length is not None else 3 < out.shape[1] <= 5


# ------------------------------------------------------------------------------ lm-eval model arguments
LM_EVAL = [
    ("batch_size-0", {"batch_size": 0}, "batch_size must be an integer >= 1"),
    ("batch_size-negative", {"batch_size": -2}, "batch_size must be an integer >= 1"),
    ("batch_size-word", {"batch_size": "many"}, "batch_size must be an integer >= 1"),
    ("batch_size-bool", {"batch_size": True}, "batch_size must be an integer >= 1"),
    ("batch_size-float", {"batch_size": 2.5}, "batch_size must be an integer >= 1"),
    ("max_length-0", {"max_length": "0"}, "max_length must be an integer >= 1"),
    ("max_length-word", {"max_length": "long"}, "max_length must be an integer >= 1"),
    ("max_gen_toks-0", {"max_gen_toks": 0}, "max_gen_toks must be an integer >= 1"),
    ("max_gen_toks-negative", {"max_gen_toks": "-1"}, "max_gen_toks must be an integer >= 1"),
    ("dtype-unknown", {"dtype": "float8"}, "dtype must name a torch dtype"),
    ("dtype-not-a-dtype", {"dtype": "nn"}, "dtype must name a torch dtype"),
]


@pytest.mark.parametrize(("options", "fragment"), [pytest.param(o, f, id=i) for i, o, f in LM_EVAL])
def test_bad_lm_eval_model_argument(chat_model, options, fragment):
    pytest.importorskip("lm_eval")
    from qadapter.evaluation.lm_eval_model import QAdapterLM

    expect(lambda: QAdapterLM(chat_model, **options), (TypeError, ValueError), fragment)


def test_lm_eval_model_without_tokenizer_is_refused():
    pytest.importorskip("lm_eval")
    from qadapter.evaluation.lm_eval_model import QAdapterLM

    expect(lambda: QAdapterLM(QAdapterModel(tiny_causal_lm("llama"))), ValueError, "has no tokenizer")


def test_lm_eval_model_unknown_argument(chat_model):
    pytest.importorskip("lm_eval")
    from qadapter.evaluation.lm_eval_model import QAdapterLM

    expect(lambda: QAdapterLM.create_from_arg_string("adapter_path=x"), TypeError, "adapter_path")


def test_lm_eval_model_missing_adapter(tmp_path):
    pytest.importorskip("lm_eval")
    from qadapter.evaluation.lm_eval_model import QAdapterLM

    expect(lambda: QAdapterLM(str(tmp_path / "none")), AdapterLoadError, "no such folder")


@pytest.mark.parametrize(("options", "check"), [
    ({"batch_size": "4"}, lambda lm: lm.batch_size == 4),
    ({"max_length": "64"}, lambda lm: lm.max_length == 64),
    ({"dtype": "float32"}, lambda lm: lm.batch_size == 8),
    ({"device": "cpu"}, lambda lm: lm.device.type == "cpu"),
], ids=["batch_size-str", "max_length-str", "dtype", "device"])
def test_valid_lm_eval_model_argument(chat_model, options, check):
    pytest.importorskip("lm_eval")
    from qadapter.evaluation.lm_eval_model import QAdapterLM

    assert check(QAdapterLM(chat_model, **options))
