"""The model layer takes its loss options from qadapter_kernels.LossConfig (fields, defaults, help,
checks), wraps existing PEFT models through a public constructor, keeps loading adapters saved
before the change, and decodes through the backend's combine where it declares one."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

pytest.importorskip("peft")
from helpers import tiny_causal_lm, tiny_chat_tokenizer  # noqa: E402
from qadapter.cli import build_parser, main  # noqa: E402
from qadapter.cli.arguments import options_from  # noqa: E402
from qadapter.evaluation.measures import answers  # noqa: E402
from qadapter.experiments.options import DemoOptions  # noqa: E402
from qadapter.library.model import QAdapterModel, base_fingerprint, select_combine  # noqa: E402
from qadapter.library.trainer import LOSS_ARGUMENTS, QAdapterConfig  # noqa: E402

from qadapter_kernels import LossConfig, combine_logits, registry  # noqa: E402


def trained_looking(model: QAdapterModel) -> QAdapterModel:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return model


def prompts():
    ids = torch.tensor([[0, 0, 5, 9, 14], [7, 3, 8, 21, 40]])
    return ids, (ids != 0).long()


# ------------------------------------------------------------------------------- loss options
def test_training_config_takes_every_loss_field_from_loss_config():
    config = QAdapterConfig(output_dir="unused", report_to=[])
    defaults = {f.name: f for f in dataclasses.fields(LossConfig)}
    fields = {f.name: f for f in dataclasses.fields(QAdapterConfig)}
    # The data fixes the label; the model fixes the soft cap.
    assert set(LOSS_ARGUMENTS) == set(LossConfig.names()) - {"ignore_index", "logit_softcap"}
    for name in LOSS_ARGUMENTS:
        assert getattr(config, name) == defaults[name].default
        assert fields[name].metadata["help"] == defaults[name].metadata["help"]
        assert fields[name].metadata.get("choices") == defaults[name].metadata.get("choices")
    assert config.model_options()["loss"] == LossConfig()
    assert config.backend == "auto" and not hasattr(config, "loss_backend")


def test_training_config_refuses_bad_and_unknown_options():
    with pytest.raises(ValueError, match="alpha_0 must be >= 0"):
        QAdapterConfig(output_dir="unused", report_to=[], alpha_0=-1.0)
    with pytest.raises(TypeError, match="alpha"):
        QAdapterConfig(output_dir="unused", report_to=[], alpha=1.0)
    # An option its backend does not implement: refused here, not at the first step once the model loaded.
    with pytest.raises(ValueError, match="grad_filter_eps='auto' asks for gradient filtering, which the reference"):
        QAdapterConfig(output_dir="unused", report_to=[], backend="reference", grad_filter_eps="auto")


@pytest.mark.parametrize("name, value, expected", [("lora_r", "4", "an integer"), ("lora_r", True, "an integer"),
                                                   ("lora_r", 4.0, "an integer"), ("lora_alpha", None, "a number"),
                                                   ("learning_rate", "1e-3", "a number"),
                                                   ("gradient_accumulation_steps", None, "an integer"),
                                                   ("seed", torch.tensor(True), "an integer")])
def test_training_config_from_python_refuses_counts_and_rates_of_other_types(name, value, expected):
    """The command line converts its options' text; a Python caller's string, None or bool is refused
    naming the option, not failed in a comparison (or a bool count taken as 0 or 1)."""
    with pytest.raises(TypeError, match=re.escape(f"--{name} must be {expected}; got {value!r}")):
        QAdapterConfig(output_dir="unused", report_to=[], **{name: value})


def test_training_config_takes_numpy_and_torch_scalars_as_plain_numbers():
    import numpy as np

    config = QAdapterConfig(output_dir="unused", report_to=[], lora_r=np.int64(4), lora_alpha=np.float32(8.0),
                            learning_rate=torch.tensor(1e-3, dtype=torch.float64), seed=np.int32(3),
                            gradient_accumulation_steps=np.array(2), chunk_size=np.int64(8))
    assert (config.lora_r, config.lora_alpha, config.learning_rate, config.seed) == (4, 8.0, 1e-3, 3)
    assert (config.gradient_accumulation_steps, config.chunk_size) == (2, 8)
    assert {type(config.lora_r), type(config.lora_alpha), type(config.seed), type(config.chunk_size)} == {int, float}
    json.loads(config.to_json_string())  # saved with the run's options


def test_training_config_takes_a_non_integer_lora_alpha_as_the_model_does():
    """LoRA's alpha is a real number (the model keeps 12.5 as its scale): the command line takes one too,
    where an int-typed option refused it."""
    import argparse

    from qadapter.cli.train import _training_config

    assert QAdapterConfig(output_dir="unused", report_to=[], lora_alpha=12.5).lora_alpha == 12.5
    args = argparse.Namespace(output="unused", skip_invalid=False)
    assert _training_config(args, ["--lora_alpha", "12.5"]).lora_alpha == 12.5
    assert _training_config(args, ["--lora_alpha", "16"]).model_options()["lora_alpha"] == 16


class Built(BaseException):
    """Stops ``qadapter train`` once it builds the model: the options are what the test wants (not an
    Exception, which the command would report as an unexpected error, exit 3)."""


@pytest.fixture
def built_options(monkeypatch):
    seen = {}

    def capture(cls, model, **options):
        seen.update(options)
        raise Built

    monkeypatch.setattr(QAdapterModel, "from_base", classmethod(capture))
    return seen


def _pairs_file(tmp_path):
    """A valid data file: the data's rows are checked before the model is built."""
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    return str(path)


def test_train_command_defaults_are_loss_config_defaults(built_options, tmp_path):
    with pytest.raises(Built):
        main(["train", "--data", _pairs_file(tmp_path), "--output", str(tmp_path / "out")])
    assert built_options["loss"] == LossConfig() and built_options["backend"] == "auto"
    assert built_options["chunk_size"] is None
    assert built_options["padding_free"] is True


def test_train_command_runs_padded_when_asked(built_options, tmp_path):
    with pytest.raises(Built):
        main(["train", "--data", _pairs_file(tmp_path), "--output", str(tmp_path / "out"), "--padding_free", "false"])
    assert built_options["padding_free"] is False


def test_train_command_passes_loss_options_to_the_model(built_options, tmp_path):
    with pytest.raises(Built):
        main(["train", "--data", _pairs_file(tmp_path), "--output", str(tmp_path / "out"), "--alpha_0", "0.25",
              "--value_at", "next", "--backend", "chunked", "--chunk_size", "16"])
    assert built_options["loss"] == LossConfig(alpha_0=0.25, value_at="next")
    assert built_options["backend"] == "chunked" and built_options["chunk_size"] == 16


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("1e-6", 1e-6), ("0", 0.0)])
def test_train_command_takes_a_number_or_auto_for_grad_filter_eps(built_options, tmp_path, value, expected):
    with pytest.raises(Built):
        main(["train", "--data", _pairs_file(tmp_path), "--output", str(tmp_path / "out"), "--backend", "chunked",
              "--grad_filter_eps", value])
    assert built_options["loss"].grad_filter_eps == expected


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--alpha_0", "-1"], "alpha_0 must be >= 0"),
        (["--value_at", "sideways"], "--value_at"),
        (["--backend", "fastest"], "--backend"),
        (["--alpha", "1"], "unrecognized arguments: --alpha"),
        (["--grad_filter_eps", "sometimes"], "grad_filter_eps must be 'auto' or a probability budget in [0, 1)"),
        # Before the data (here none) or the base loads: the option pair, not the first step, is refused.
        (["--backend", "reference", "--grad_filter_eps", "auto"],
         "grad_filter_eps='auto' asks for gradient filtering, which the reference backend does not implement"),
    ],
)
def test_train_command_refuses_bad_loss_options(extra, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", "pairs.jsonl", "--output", str(tmp_path), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_model_takes_a_loss_config_and_single_options():
    model = QAdapterModel(tiny_causal_lm("llama"))
    assert model.loss == LossConfig() and model.backend == "auto" and model.chunk_size is None
    model = QAdapterModel(tiny_causal_lm("llama"), loss=LossConfig(alpha_0=0.3, beta=0.5), beta=0.2)
    assert model.loss == LossConfig(alpha_0=0.3, beta=0.2)


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        ({"alpha": 1.0}, TypeError, "unknown loss option.*alpha.*the options are alpha_tilde"),
        ({"loss_backend": "chunked"}, TypeError, "unknown loss option.*loss_backend"),
        ({"alpha_tilde": 0.0}, ValueError, "alpha_tilde must be > 0"),
        ({"backend": "fastest"}, ValueError, "backend must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"backend": "reference", "grad_filter_eps": 1e-3}, ValueError,
         r"grad_filter_eps=0\.001 asks for gradient filtering, which the reference backend does not implement"),
    ],
)
def test_model_refuses_bad_options_before_attaching_an_adapter(options, error, pattern):
    base = tiny_causal_lm("llama")
    with pytest.raises(error, match=pattern):
        QAdapterModel(base, **options)
    assert not any("lora_" in name for name, _ in base.named_parameters())


# ------------------------------------------------------------------------ saving and wrapping
def test_saved_config_holds_loss_config_and_loads(tmp_path):
    model = trained_looking(QAdapterModel(tiny_causal_lm("llama"), alpha_0=0.3, chunk_size=8))
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "qadapter_config.json").read_text())["loss"]
    assert saved == {**LossConfig(alpha_0=0.3).as_dict(), "backend": "auto", "chunk_size": 8}
    loaded = QAdapterModel.from_pretrained(tmp_path / "adapter", tiny_causal_lm("llama"))
    assert (loaded.loss, loaded.backend, loaded.chunk_size) == (model.loss, "auto", 8)


def test_adapters_saved_before_loss_config_still_load(tmp_path):
    """The "loss" section as it was written before: no ignore_index, the same other keys."""
    model = trained_looking(QAdapterModel(tiny_causal_lm("llama"), alpha_tilde=0.7, value_at="next"))
    ids, mask = prompts()
    expected = model.generate(ids, mask, max_new_tokens=5, eos_token_id=[])
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    config = json.loads((path / "qadapter_config.json").read_text())
    config["loss"] = {"alpha_tilde": 0.7, "alpha_0": 0.01, "gamma": 1.0, "beta": 0.1, "value_at": "next",
                      "reward_norm": "padded", "backend": "chunked", "chunk_size": None}
    (path / "qadapter_config.json").write_text(json.dumps(config))
    loaded = QAdapterModel.from_pretrained(path, tiny_causal_lm("llama"))
    assert loaded.loss == LossConfig(alpha_tilde=0.7, value_at="next") and loaded.backend == "chunked"
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=5, eos_token_id=[]), expected)


def test_from_peft_model_wraps_an_attached_adapter():
    model = trained_looking(QAdapterModel(tiny_causal_lm("llama")))
    wrapped = QAdapterModel.from_peft_model(model.peft_model, alpha_0=0.2, backend="chunked")
    assert wrapped.peft_model is model.peft_model and wrapped.loss == LossConfig(alpha_0=0.2)
    # The fingerprint of a PEFT model is its base's, as computed before the adapter was attached.
    assert wrapped.fingerprint == model.fingerprint == base_fingerprint(tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match="PEFT model with a LoRA adapter"):
        QAdapterModel.from_peft_model(tiny_causal_lm("llama"))


@pytest.mark.parametrize("option, fragment", [
    ({"bias": "all"}, "bias='all' trains the base model's own biases"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"init_lora_weights": "pissa"}, "rewrites the base model's weights"),
    ({"init_lora_weights": "olora"}, "rewrites the base model's weights"),
    ({"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
    ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
])
def test_a_peft_model_whose_lora_changes_its_base_is_refused(option, fragment):
    """PEFT options under which the model with its adapter disabled is not the base (or decoding's
    frozen rows would run a trained copy): the frozen policy would not be pi1, so they are refused."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_causal_lm("qwen2"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], **option))
    with pytest.raises(ValueError, match=re.escape(fragment)):
        QAdapterModel.from_peft_model(peft)


def test_a_dora_model_is_told_at_once_that_decoding_refuses_it():
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_causal_lm("qwen2"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"],
                                                               use_dora=True))
    with pytest.warns(UserWarning, match="use_dora=True: training and evaluation take DoRA, but decoding"):
        QAdapterModel.from_peft_model(peft)


def test_base_answers_of_a_qadapter_model_are_its_base_models():
    tokenizer = tiny_chat_tokenizer()
    questions = ["hello world", "the capital of France"]
    model = trained_looking(QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer))))
    plain = answers(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer, questions, customized=False,
                    max_new_tokens=5)
    assert answers(model, tokenizer, questions, customized=False, max_new_tokens=5) == plain
    with pytest.raises(TypeError, match="QAdapterModel"):
        answers(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer, questions, customized=True)


# ------------------------------------------------------------------------------ decode combine
def test_decode_combine_is_eager_on_cpu():
    cpu = torch.device("cpu")
    assert select_combine("auto", cpu, torch.float32) is combine_logits
    assert select_combine("chunked", cpu, torch.bfloat16) is combine_logits
    assert select_combine("cuda", cpu, torch.float32) is combine_logits  # not runnable here: eager


def test_decode_combine_is_the_records_where_it_declares_one(monkeypatch):
    def kernel(*args, **kwargs):
        return combine_logits(*args, **kwargs)

    record = dataclasses.replace(registry.get("chunked"), name="fake", combine=kernel, float64=False)
    monkeypatch.setattr(registry, "resolve", lambda name, device, dtype=None: record)
    assert select_combine("auto", torch.device("cpu"), torch.float32) is kernel
    assert select_combine("auto", torch.device("cpu"), torch.float64) is combine_logits  # float32-only kernel
    # A named backend the same: its kernel, or the eager combine for what the kernel does not take.
    monkeypatch.setattr(registry, "get", lambda name: record)
    monkeypatch.setattr(registry, "status", lambda name: registry.BackendStatus(name, True))
    assert select_combine("fake", torch.device("cpu"), torch.float32) is kernel
    assert select_combine("fake", torch.device("cpu"), torch.float64) is combine_logits


def test_generate_decodes_with_the_backends_combine(monkeypatch):
    model = trained_looking(QAdapterModel(tiny_causal_lm("llama"), alpha_tilde=0.8, alpha_0=0.3))
    ids, mask = prompts()
    eager = model.generate(ids, mask, max_new_tokens=7, eos_token_id=[])
    calls = []

    def counting(base_logits, q_values, **options):
        calls.append(options)
        return combine_logits(base_logits, q_values, **options)

    record = dataclasses.replace(registry.get("chunked"), name="fake", combine=counting)
    resolved = []
    monkeypatch.setattr(registry, "resolve", lambda name, device, dtype=None: resolved.append((name, device)) or record)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=7, eos_token_id=[]), eager)
    assert len(calls) == 7 and calls[0] == {"alpha_tilde": 0.8, "alpha_0": 0.3}
    assert resolved == [("auto", torch.device("cpu"))]  # resolved once per generation, not per token


# --------------------------------------------------------------------------------- demo options
def test_demo_command_line_is_generated_from_demo_options():
    parser = build_parser()
    args = parser.parse_args(["demo"])
    assert options_from(args, DemoOptions, quantization=None) == DemoOptions()
    args = parser.parse_args(["demo", "--steps", "3", "--max-prompt-length", "32", "--backend", "chunked",
                              "--probe-limit", "2"])
    assert (args.max_steps, args.max_prompt_length, args.backend, args.probe_limit) == (3, 32, "chunked", 2)
