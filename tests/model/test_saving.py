"""Nothing lost: saving an adapter replaces only its own files, refuses what is not ours, and a
crash at any point leaves one whole adapter (old or new) that the next load restores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from helpers import (  # noqa: E402
    left_padded_prompts,
    make_model,
    perturb_adapter,
    tiny_causal_lm,  # noqa: E402
)
from qadapter.library import atomic  # noqa: E402
from qadapter.library.model import AdapterLoadError, QAdapterModel  # noqa: E402


def greedy(model, steps=6):
    ids, mask = left_padded_prompts()
    return model.generate(ids, mask, max_new_tokens=steps, eos_token_id=[])


def test_save_keeps_everything_else_in_the_directory(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-5" / "optimizer.pt").write_bytes(b"optimizer state")
    make_model().save_pretrained(out)
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my own model card")
    model = make_model(seed=0)
    perturb_adapter(model, seed=4)
    model.save_pretrained(out)  # again, over the first adapter
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "README.md").read_text() == "my own model card"
    assert (out / "checkpoints" / "checkpoint-5" / "optimizer.pt").read_bytes() == b"optimizer state"
    assert not list(out.glob(atomic.STAGING_PREFIX + "*"))
    assert torch.equal(greedy(QAdapterModel.from_pretrained(out, tiny_causal_lm("llama"))), greedy(model))
    # Every file the adapter is made of has a plain file's mode, whatever wrote it (not 0600).
    for name in ("adapter_model.safetensors", "adapter_config.json", "qadapter_config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


def test_a_base_loaded_from_a_relative_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """The adapter names its base so that it loads from anywhere, not only from where it was trained."""
    from helpers import tiny_chat_tokenizer

    tokenizer = tiny_chat_tokenizer()
    tiny_causal_lm("llama", vocab=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    QAdapterModel.from_base("base").save_pretrained("adapter")
    config = json.loads((tmp_path / "adapter" / "qadapter_config.json").read_text())
    assert config["base_model"] == str((tmp_path / "base").resolve())
    monkeypatch.chdir(tmp_path / "adapter")
    assert QAdapterModel.from_pretrained(tmp_path / "adapter").fingerprint == config["base_fingerprint"]


def test_a_base_folder_given_as_a_path_loads_as_by_name(tmp_path):
    """A pathlib.Path names a base folder as a string does (from_base, from_pretrained's base_model,
    AdapterSet's), not a model object."""
    from helpers import tiny_chat_tokenizer
    from qadapter.library.adapter_set import AdapterSet

    tokenizer = tiny_chat_tokenizer()
    tiny_causal_lm("llama", vocab=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = QAdapterModel.from_base(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    assert QAdapterModel.from_base(str(tmp_path / "base")).fingerprint == model.fingerprint
    again = QAdapterModel.from_pretrained(tmp_path / "adapter", base_model=tmp_path / "base")
    assert again.fingerprint == model.fingerprint and again.tokenizer is not None
    assert AdapterSet.from_pretrained({"a": tmp_path / "adapter"}, tmp_path / "base").names == ["a"]


def test_a_failed_report_or_figure_write_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path):
    class Figure:
        def savefig(self, file, format, **_):
            file.write(b"half a pn")
            raise OSError("disk full")

    atomic.write_text(tmp_path / "check.md", "old report")
    atomic.save_figure(type("Drawn", (), {"savefig": lambda self, f, format: f.write(b"PNG")})(), tmp_path / "plot.png")
    with pytest.raises(OSError, match="disk full"):
        atomic.save_figure(Figure(), tmp_path / "plot.png")
    with pytest.raises(AttributeError):  # not text: nothing written
        atomic.write_text(tmp_path / "check.md", None)
    assert (tmp_path / "plot.png").read_bytes() == b"PNG" and (tmp_path / "check.md").read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.md", "plot.png"]
    assert oct((tmp_path / "plot.png").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_earlier_adapter_naming_its_base_by_a_relative_path_asks_for_the_base(tmp_path, monkeypatch):
    """Earlier versions recorded a local base by the path it was given: from elsewhere, ``base`` reads
    as a hub name, and transformers' error (a hub out of reach, an unknown repository) named neither
    the adapter nor --base-model."""
    import qadapter.library.model as model_module
    from helpers import save_tiny_base

    save_tiny_base(tmp_path / "base")
    QAdapterModel.from_base(str(tmp_path / "base")).save_pretrained(tmp_path / "adapter")
    file = tmp_path / "adapter" / "qadapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "base_model": "base"}))
    monkeypatch.chdir(tmp_path / "adapter")

    def unreachable(name, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}")

    monkeypatch.setattr(model_module, "load_base", unreachable)
    with pytest.raises(AdapterLoadError, match=r"names its base 'base', which is no folder here .*earlier version.*"
                                               r"\(--base-model\)"):
        QAdapterModel.from_pretrained(tmp_path / "adapter")
    monkeypatch.undo()
    assert QAdapterModel.from_pretrained(tmp_path / "adapter", str(tmp_path / "base")).fingerprint


def test_refuses_a_file_and_a_foreign_directory(tmp_path):
    file = tmp_path / "adapter"
    file.write_text("not a directory")
    with pytest.raises(atomic.OutputDirectoryError, match="is a file"):
        make_model().save_pretrained(file)
    assert file.read_text() == "not a directory"
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(atomic.OutputDirectoryError, match="holds no Q-Adapter adapter"):
        make_model().save_pretrained(foreign)
    make_model().save_pretrained(foreign, overwrite=True)  # told to: written, the photo stays
    assert (foreign / "cat.jpg").read_bytes() == b"\xff\xd8" and (foreign / "qadapter_config.json").is_file()


def test_folders_named_like_checkpoints_are_not_taken_for_a_runs(tmp_path):
    """A folder is a run's output by what it holds, not by the names of its folders: a save (or
    `qadapter train --overwrite`, which removes an earlier run's checkpoints) never takes another's
    ``checkpoints`` or ``checkpoint-7`` for its own."""
    from qadapter.library.saved import checkpoint_folders, holds_adapter

    out = tmp_path / "mine"
    (out / "checkpoints" / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoints" / "model.ckpt").write_text("weights of mine")
    (out / "checkpoints" / "checkpoint-7" / "thesis.tex").write_text("chapter one")
    assert not holds_adapter(out) and checkpoint_folders(out / "checkpoints") == []
    with pytest.raises(atomic.OutputDirectoryError, match="holds no Q-Adapter adapter"):
        make_model().save_pretrained(out)
    (out / "checkpoints" / "checkpoint-8").mkdir()
    (out / "checkpoints" / "checkpoint-8" / "trainer_state.json").write_text("{}")
    assert holds_adapter(out) and checkpoint_folders(out / "checkpoints") == [out / "checkpoints" / "checkpoint-8"]


def _die_after_renames(monkeypatch, renames: int) -> None:
    """The process is killed after ``renames`` files of a save were renamed into place (SystemExit at
    the next rename), and cleans nothing up."""
    real_replace = atomic.os.replace
    calls = {"n": 0}

    def dying_replace(src, dst):
        if calls["n"] == renames:
            raise SystemExit("killed")
        calls["n"] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", dying_replace)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)


@pytest.mark.parametrize("moved_before_crash", [0, 1, 2])
def test_a_crash_between_renames_is_finished_by_the_next_load(tmp_path, monkeypatch, moved_before_crash):
    """The process dies after `moved_before_crash` of the adapter's files were renamed into place:
    the next load completes the save (the staged set was complete), so the new adapter loads."""
    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    new = make_model()
    perturb_adapter(new, seed=11)
    _die_after_renames(monkeypatch, moved_before_crash)
    with pytest.raises(SystemExit):
        new.save_pretrained(out)
    monkeypatch.undo()
    assert list(out.glob(atomic.STAGING_PREFIX + "*"))  # the interrupted save is still there
    loaded = QAdapterModel.from_pretrained(out, tiny_causal_lm("llama"))
    assert torch.equal(greedy(loaded), greedy(new))
    assert not list(out.glob(atomic.STAGING_PREFIX + "*"))


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_an_exception_between_renames_never_leaves_a_mix(tmp_path, monkeypatch, stop):
    """An exception while the staged files are renamed into place (the process lives on to unwind):
    a Ctrl-C finishes the renames before it stops the save; another error keeps the complete staged
    set for the next load to finish. Old and new files are never left side by side."""
    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    new = make_model()
    perturb_adapter(new, seed=11)
    real_replace, calls = atomic.os.replace, {"n": 0}

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise stop("at the second rename")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(stop):
        new.save_pretrained(out)
    monkeypatch.undo()
    staged = list(out.glob(atomic.STAGING_PREFIX + "*"))
    assert not staged if stop is KeyboardInterrupt else staged
    if stop is KeyboardInterrupt:  # already whole: read without the loader's recovery
        monkeypatch.setattr(atomic, "recover", lambda path, **_: None)
    else:  # a rename that keeps failing is said, naming the staged save, at every load until mended
        name = next(p.name for p in staged[0].iterdir() if p.name != atomic.COMPLETE)
        (out / name).unlink()
        (out / name).mkdir()
        (out / name / "blocking").touch()
        with pytest.raises(OSError, match=f"cannot be finished .*remove {re.escape(str(staged[0]))} to keep"):
            QAdapterModel.from_pretrained(out, tiny_causal_lm("llama"))
        shutil.rmtree(out / name)
    assert torch.equal(greedy(QAdapterModel.from_pretrained(out, tiny_causal_lm("llama"))), greedy(new))


def test_a_crash_while_writing_keeps_the_old_adapter(tmp_path, monkeypatch):
    """The unfinished staging is left by a load (a save still writing looks the same to it: a server
    reading a trainer's output must not take its save away) and dropped by the next save."""
    out = tmp_path / "adapter"
    old = make_model()
    old.save_pretrained(out)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)

    def write_then_die(self, directory):
        (directory / "adapter_model.safetensors").write_bytes(b"half written")
        raise SystemExit("killed")

    monkeypatch.setattr(QAdapterModel, "write_adapter", write_then_die)
    with pytest.raises(SystemExit):
        make_model(seed=3).save_pretrained(out)
    monkeypatch.undo()
    assert torch.equal(greedy(QAdapterModel.from_pretrained(out, tiny_causal_lm("llama"))), greedy(old))
    assert [p.name for p in out.glob(atomic.STAGING_PREFIX + "*/*") if p.name != atomic.WRITER] == [
        "adapter_model.safetensors"]
    make_model(seed=4).save_pretrained(out)
    assert not list(out.glob(atomic.STAGING_PREFIX + "*"))


def test_a_staged_set_never_marked_complete_is_dropped_not_moved_in(tmp_path):
    """A save that died while writing (its staging unmarked, its writer gone) left part of a new
    adapter: a reader leaves it, the next save drops it, and neither moves a file of it in."""
    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    staging = out / (atomic.STAGING_PREFIX + "died")
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(b"half a new adapter")
    atomic.recover(out, reading=True)
    assert staging.is_dir() and {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    atomic.recover(out)
    assert not staging.exists() and {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_save_leaves_another_writers_staging_while_it_writes(tmp_path):
    """Two writers of one directory: a save drops an unfinished staging directory only once its writer
    is gone (its lock released), never one still being written."""
    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    other = out / (atomic.STAGING_PREFIX + "other")
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes(b"being written")
    holder = open(other / atomic.WRITER, "a")  # noqa: SIM115 -- the other writer, still writing
    assert atomic._locked(holder)
    make_model(seed=3).save_pretrained(out)
    assert (other / "adapter_model.safetensors").read_bytes() == b"being written"
    holder.close()  # it died
    make_model(seed=4).save_pretrained(out)
    assert not other.exists()


def test_a_run_holds_its_output_directory(tmp_path, capsys):
    """``qadapter train`` holds its --output: a second run there is refused before anything loads
    (each would report success, one having written over the other); a file on the way to it too."""
    from qadapter.cli import main

    out = tmp_path / "run"
    holding = atomic.hold(out)
    with pytest.raises(atomic.OutputDirectoryError, match="being written by another process"):
        atomic.hold(out)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "the capital of France?", "chosen": "Paris", "rejected": "Rome"}) + "\n")
    args = ["train", "--data", str(data), "--model", "/nonexistent"]  # refused before the model would load
    with pytest.raises(SystemExit) as exc:
        main([*args, "--output", str(out)])
    assert exc.value.code == 2 and "being written by another process" in capsys.readouterr().err
    holding.close()
    atomic.check_target(out, is_ours=lambda path: False, overwrite=False)  # its lock file alone: still empty
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:
        main([*args, "--output", str(tmp_path / "afile" / "sub")])
    assert exc.value.code == 2 and "afile is a file, not a directory" in capsys.readouterr().err


def test_cli_train_refuses_a_foreign_output_before_loading_anything(tmp_path):
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("\\documentclass{article}")
    run = subprocess.run([sys.executable, "-m", "qadapter", "train", "--data", str(tmp_path / "none.jsonl"),
                          "--output", str(foreign), "--model", "/nonexistent"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "holds no Q-Adapter adapter" in run.stderr, run.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def _rewrite_weights(path, change):
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "adapter_model.safetensors")
    save_file(change(dict(weights)), path / "adapter_model.safetensors")


@pytest.mark.parametrize("change, fragment", [
    (lambda w: {k: v for i, (k, v) in enumerate(sorted(w.items())) if i}, "missing ['base_model"),
    (lambda w: {**w, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.ones(8, 32)},
     "unexpected ['base_model.model.model.layers.0.mlp.up_proj"),
    (lambda w: {k.replace("q_proj", "k_proj"): v for k, v in w.items()}, "missing"),
])
def test_weights_that_contradict_the_config_are_refused(tmp_path, change, fragment):
    """Missing, extra or renamed LoRA tensors loaded with a warning and acted as the bare base model."""
    from qadapter.library.model import AdapterLoadError

    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    _rewrite_weights(out, change)
    with warnings.catch_warnings(record=True) as shown, pytest.raises(AdapterLoadError,
                                                                    match="does not match its adapter config") as info:
        warnings.simplefilter("always")
        QAdapterModel.from_pretrained(out, tiny_causal_lm("llama"))
    assert fragment in str(info.value)
    # The one-line refusal says it all: PEFT's warnings listing every key are held back, not shown first.
    assert not [w for w in shown if "adapter keys" in str(w.message)], [str(w.message)[:80] for w in shown]


@pytest.mark.parametrize("loss, fragment", [
    ({"alpha_tilde": "x"}, "alpha_tilde must be a real number"),
    ({"backend": "fastest"}, "backend must be one of"),
    ({"chunk_size": -3}, "chunk_size must be an integer >= 1"),
    ({"gamma": -1.0}, "gamma must be >= 0"),
])
def test_bad_saved_options_are_refused_before_the_base_loads(tmp_path, loss, fragment):
    import json

    from qadapter.library.model import AdapterLoadError

    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    config = json.loads((out / "qadapter_config.json").read_text())
    config["loss"].update(loss)
    (out / "qadapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match="holds an invalid option") as info:
        QAdapterModel.from_pretrained(out, "/nonexistent/base")  # never reached: the config fails first
    assert fragment in str(info.value)


@pytest.mark.parametrize("version", [0, 4, "1"])
def test_a_format_version_this_reader_does_not_know_is_refused_before_the_base_loads(tmp_path, version):
    """A later writer's adapter (format_version 4) may mean what this version cannot read: refused by its
    version, not loaded as if it were one of the three known."""
    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    config = json.loads((out / "qadapter_config.json").read_text())
    config["format_version"] = version
    (out / "qadapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match=f"has format_version {version}; this version reads 1, 2"):
        QAdapterModel.from_pretrained(out, "/nonexistent/base")  # never reached: the config fails first


def test_numpy_integer_options_are_saved_as_plain_ints(tmp_path):
    import numpy as np

    out = tmp_path / "adapter"
    make_model(chunk_size=np.int64(8), ignore_index=np.int64(-100)).save_pretrained(out)
    loss = json.loads((out / "qadapter_config.json").read_text())["loss"]
    assert (loss["chunk_size"], loss["ignore_index"]) == (8, -100)


def test_chat_template_options_are_saved_and_loaded_with_the_adapter(tmp_path):
    quiet = {"enable_thinking": False}
    out = tmp_path / "adapter"
    make_model(chat_template_kwargs=quiet).save_pretrained(out)
    file = out / "qadapter_config.json"
    config = json.loads(file.read_text())
    assert config["chat_template_kwargs"] == quiet
    assert QAdapterModel.from_pretrained(out, tiny_causal_lm("llama")).chat_template_kwargs == quiet
    del config["chat_template_kwargs"]  # an adapter saved before the options were recorded: none
    file.write_text(json.dumps(config))
    assert QAdapterModel.from_pretrained(out, tiny_causal_lm("llama")).chat_template_kwargs == {}
    file.write_text(json.dumps({**config, "chat_template_kwargs": {"add_generation_prompt": False}}))
    with pytest.raises(AdapterLoadError, match="holds invalid chat template options: chat_template_kwargs cannot "
                                               "set add_generation_prompt"):
        QAdapterModel.from_pretrained(out, "/nonexistent/base")  # never reached: the config fails first


def test_the_model_card_names_the_chat_template_options_its_prompts_take():
    """Whoever reads the hub's card prompts the adapter as it was trained (or knows why it answers otherwise)."""
    from qadapter.library.saved import model_card

    config = make_model(chat_template_kwargs={"enable_thinking": False}).adapter_config()
    assert 'chat template options `{"enable_thinking": false}`' in model_card("me/quiet", config)
    assert "chat template options" not in model_card("me/plain", make_model().adapter_config())


def test_an_adapter_with_chat_template_options_is_refused_by_readers_that_would_ignore_them(tmp_path):
    """A reader that predates the options (it reads format versions 1 and 2) would render the
    adapter's prompts without them, answering otherwise with no error: its version is one it refuses.
    An adapter without options keeps version 1, which every reader reads."""
    make_model(chat_template_kwargs={"enable_thinking": False}).save_pretrained(tmp_path / "quiet")
    make_model().save_pretrained(tmp_path / "plain")
    version = json.loads((tmp_path / "quiet" / "qadapter_config.json").read_text())["format_version"]
    assert version not in (1, 2)
    assert QAdapterModel.from_pretrained(tmp_path / "quiet", tiny_causal_lm("llama")).chat_template_kwargs == {
        "enable_thinking": False}
    assert json.loads((tmp_path / "plain" / "qadapter_config.json").read_text())["format_version"] == 1


@pytest.mark.parametrize("peft, fragment", [
    ({"r": 300_000}, "asks for LoRA rank 300000 (r 300000), which is not the adapter's: its weights have rank [8]"),
    ({"rank_pattern": {"q_proj": 10**6}}, "asks for LoRA rank 1000000"),
    ({"r": 4}, "asks for LoRA rank 4 (r 4), which is not the adapter's: its weights have rank [8], "
               "qadapter_config.json records r 8"),
    ({"r": "8"}, "r and rank_pattern's ranks must be integers >= 1"),
])
def test_a_peft_config_whose_rank_is_not_the_weights_is_refused_before_the_base_loads(tmp_path, peft, fragment):
    """PEFT allocates every LoRA matrix at its config's rank before it reads a weight: an edited or
    foreign adapter_config.json could make a load (a server's, on first use) allocate without bound."""
    from qadapter.library.model import AdapterLoadError

    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **peft}))
    with pytest.raises(AdapterLoadError, match=re.escape(fragment)):
        QAdapterModel.from_pretrained(out, "/nonexistent/base")  # never reached: the config fails first
    (out / "adapter_config.json").unlink()
    with pytest.raises(AdapterLoadError, match="is an incomplete adapter: PEFT's adapter_config.json is missing"):
        QAdapterModel.from_pretrained(out, "/nonexistent/base")


def test_a_weights_file_that_is_not_safetensors_is_named(tmp_path):
    """A Git LFS pointer (a clone without LFS) or a cut-short download where the weights should be."""
    from qadapter.library.model import AdapterLoadError

    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    (out / "adapter_model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    with pytest.raises(AdapterLoadError, match=f"the weights in {re.escape(str(out))} cannot be loaded .*"
                                               "adapter_model.safetensors cannot be read"):
        QAdapterModel.from_pretrained(out, "/nonexistent/base")


def test_a_reader_finishing_a_save_as_it_is_written_leaves_it_whole(tmp_path, monkeypatch):
    """A server loading an adapter a trainer is saving: the reader finishes the marked set (and removes
    its staging) between the writer's mark and its renames; the writer's save still succeeds."""
    atomic.write_texts(tmp_path, {"a.txt": "old", "b.txt": "old"})
    real_fsync = atomic._fsync_dir

    def reader_between(path):
        real_fsync(path)
        if path.name.startswith(atomic.STAGING_PREFIX) and (path / atomic.COMPLETE).is_file():
            atomic.recover(tmp_path, reading=True)

    monkeypatch.setattr(atomic, "_fsync_dir", reader_between)
    atomic.write_texts(tmp_path, {"a.txt": "new", "b.txt": "new"})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.txt": "new", "b.txt": "new"}


def test_a_deleted_weights_file_is_named(tmp_path):
    from qadapter.library.model import AdapterLoadError

    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors is missing"):
        QAdapterModel.from_pretrained(out, "/nonexistent/base")


# The kill tests. Each SIGKILLs a real process at a moment drawn from random.Random(attempt), 24 kills
# in all; the processes are forked by a fork server (fork_server.py) that has imported the model layer
# once, so a kill costs a second or two, not a fresh interpreter's imports. Every assertion holds
# wherever the kill lands, the child having already exited included.


@pytest.fixture(scope="module")
def fork_server():
    from fork_server import ForkServer

    server = ForkServer({**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    yield server
    server.close()


def _log(path) -> str:
    return f"child output ({path}):\n{path.read_text()[-3000:] if path.exists() else '(none)'}"


def _kill(server, log) -> dict:
    """SIGKILLs the child (unless it has exited by itself: then it must have succeeded)."""
    end = server.kill()
    assert end["killed"] or end["code"] == 0, _log(log)
    return end


def _wait_until(server, condition, timeout=120.0) -> bool:
    """Polls ``condition`` until it holds (True) or the child ends or the time is up (False)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if not server.running() or time.monotonic() > deadline:
            return condition()
        time.sleep(0.005)
    return True


def _run(server, log, argv) -> None:
    """Runs ``qadapter`` with ``argv`` in a child to its end, which must be a success."""
    server.start(log, argv=argv)
    end = server.wait(timeout=300)
    assert end["code"] == 0 and not end.get("timed_out"), _log(log)


def _lora_b(model):
    return {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if "lora_B" in n}


def _versions(log) -> list[int]:
    return [int(line) for line in log.read_text().splitlines() if line.strip().isdigit()]


@pytest.mark.parametrize("attempt", range(8))
def test_sigkill_during_repeated_saves_leaves_a_whole_adapter(fork_server, tmp_path, attempt):
    """A process saving over and over is killed (SIGKILL) at a random moment; the adapter then
    loads, and is exactly one of the versions the process was saving (never a mix)."""
    import random
    import time

    out, log = tmp_path / "adapter", tmp_path / "child.log"
    fork_server.start(log, save_loop_into=out)
    assert _wait_until(fork_server, lambda: log.exists() and _versions(log)[:1] == [0], timeout=60), _log(log)
    time.sleep(random.Random(attempt).uniform(0.0, 0.4))  # a save takes about 0.1 s
    _kill(fork_server, log)
    last = _versions(log)[-1]
    loaded = _lora_b(QAdapterModel.from_pretrained(out, tiny_causal_lm("llama")))
    model = make_model()
    candidates = []
    for version in (last, last + 1):  # the last announced save, or the one that was being made
        perturb_adapter(model, seed=version)
        candidates.append(_lora_b(model))
    assert any(all(torch.equal(loaded[n], c[n]) for n in c) for c in candidates)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A tiny local base model and a preference file for ``qadapter train``."""
    import json

    from helpers import save_tiny_base

    root = tmp_path_factory.mktemp("run")
    save_tiny_base(root / "base")
    rows = [{"prompt": f"hello world {i}", "chosen": "the capital", "rejected": "of France"} for i in range(8)]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _train_argv(run, output, *extra):
    """``qadapter train``'s arguments: a checkpoint every step, the last three kept."""
    return ["train", "--model", str(run / "base"), "--data", str(run / "pairs.jsonl"), "--output", str(output),
            "--max_steps", "400", "--save_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true",
            "--save_total_limit", "3", *extra]


@pytest.fixture(scope="module")
def finished_run(local_run, fork_server, tmp_path_factory):
    """The output of a run trained to step 2 and finished: its adapter, checkpoints 1 and 2."""
    root = tmp_path_factory.mktemp("finished")
    _run(fork_server, root / "train.log", _train_argv(local_run, root / "adapter", "--max_steps", "2"))
    return root / "adapter"


def _weights(path):
    from safetensors.torch import load_file

    return load_file(Path(path) / "adapter_model.safetensors")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _step(checkpoint) -> int:
    return int(str(checkpoint).rsplit("-", 1)[1])


def _finish(server, run, output, log, steps) -> None:
    """``--resume`` to ``steps`` ends well: its last checkpoint and its adapter (saved at that step,
    whole) load, and no save is left half done."""
    import json

    from qadapter.library.trainer import latest_checkpoint

    _run(server, log, _train_argv(run, output, "--resume", "--max_steps", str(steps)))
    newest = latest_checkpoint(output / "checkpoints")
    assert _step(newest) == steps
    QAdapterModel.from_pretrained(newest, str(run / "base"))
    QAdapterModel.from_pretrained(output, str(run / "base"))
    assert _same(_weights(output), _weights(newest))
    training = json.loads((output / "provenance.json").read_text())["training"]
    assert training["global_step"] == steps and training["completed"]
    assert not list(output.rglob(atomic.STAGING_PREFIX + "*"))


def _complete_checkpoint(checkpoints):
    """The newest complete checkpoint (None if there is none yet), without the warnings for others."""
    import warnings

    from qadapter.library.trainer import latest_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return latest_checkpoint(checkpoints)


@pytest.mark.parametrize("attempt", range(4))
def test_sigkill_while_checkpointing_then_resume(local_run, fork_server, tmp_path, attempt):
    """``qadapter train`` checkpointing every step is SIGKILLed at a random moment; the newest
    complete checkpoint left then loads, and ``--resume`` continues from it to the end."""
    import random
    import time

    from qadapter.library.trainer import latest_checkpoint

    output, log = tmp_path / "adapter", tmp_path / "killed.log"
    fork_server.start(log, argv=_train_argv(local_run, output))
    checkpoints = output / "checkpoints"
    assert _wait_until(fork_server, lambda: _complete_checkpoint(checkpoints) is not None), _log(log)
    time.sleep(random.Random(attempt).uniform(0.0, 1.5))  # a step and its checkpoint take about 0.1 s
    _kill(fork_server, log)

    newest = latest_checkpoint(checkpoints)
    QAdapterModel.from_pretrained(newest, str(local_run / "base"))
    _finish(fork_server, local_run, output, tmp_path / "resumed.log", _step(newest) + 2)


@pytest.mark.parametrize("attempt", range(6))
def test_sigkill_during_the_final_save_then_resume(local_run, finished_run, fork_server, tmp_path, attempt):
    """A run resumed from step 2 to 4 over a finished run's output is SIGKILLed around its final save:
    after the last checkpoint, while the adapter is staged or renamed into place, or after. The output
    then holds the old adapter of step 2 or the new one of step 4, whole (its weights and its record from
    the same save), the newest complete checkpoint loads, and ``--resume`` ends with the adapter of step 4."""
    import json
    import random
    import shutil
    import time

    from qadapter.library.trainer import latest_checkpoint

    output, log = tmp_path / "adapter", tmp_path / "killed.log"
    shutil.copytree(finished_run, output)
    old_weights, old_record = _weights(output), (output / "provenance.json").read_bytes()
    fork_server.start(log, argv=_train_argv(local_run, output, "--resume", "--max_steps", "4"))
    # The final save stages the adapter in a hidden folder of the output a few ms after the last
    # checkpoint, for some 20 to 70 ms; the process ends some 50 ms later. Half the kills are timed from
    # the staging folder's appearance, to land inside the save; the others from the last checkpoint.
    if attempt % 2:
        last_checkpoint = output / "checkpoints" / "checkpoint-4" / "trainer_state.json"
        _wait_until(fork_server, last_checkpoint.exists)
        time.sleep(random.Random(attempt).uniform(0.0, 0.1))
    else:
        _wait_until(fork_server, lambda: any(output.glob(atomic.STAGING_PREFIX + "*")))
        time.sleep(random.Random(attempt).uniform(0.0, 0.03))
    _kill(fork_server, log)

    QAdapterModel.from_pretrained(output, str(local_run / "base"))  # finishes a save cut short after staging
    newest = latest_checkpoint(output / "checkpoints")
    QAdapterModel.from_pretrained(newest, str(local_run / "base"))
    weights = _weights(output)
    if _same(weights, old_weights):
        assert (output / "provenance.json").read_bytes() == old_record
    else:
        assert _step(newest) == 4 and _same(weights, _weights(newest))
        assert json.loads((output / "provenance.json").read_text())["training"]["global_step"] == 4
    _finish(fork_server, local_run, output, tmp_path / "resumed.log", 4)


@pytest.mark.parametrize("attempt", range(3))
def test_sigkill_during_resume_then_resume_again(local_run, finished_run, fork_server, tmp_path, attempt):
    """``--resume`` (from step 2 to 6) is itself SIGKILLed at a random moment, twice running: while it
    loads, trains, checkpoints or saves, or after it ended. Each time the newest complete checkpoint
    loads and holds at least the step the one before held, the adapter is the old one or the finished
    one, whole, and a last ``--resume`` ends at step 6."""
    import random
    import shutil
    import time

    from qadapter.library.trainer import latest_checkpoint

    rng = random.Random(attempt)
    output = tmp_path / "adapter"
    shutil.copytree(finished_run, output)
    old_weights = _weights(output)
    reached = 2
    for kill in range(2):
        log = tmp_path / f"killed-{kill}.log"
        fork_server.start(log, argv=_train_argv(local_run, output, "--resume", "--max_steps", "6"))
        time.sleep(rng.uniform(0.0, 1.8))  # it loads for about 1 s, then trains and saves for about 0.5 s
        _kill(fork_server, log)
        newest = latest_checkpoint(output / "checkpoints")
        assert _step(newest) >= reached
        reached = _step(newest)
        QAdapterModel.from_pretrained(newest, str(local_run / "base"))
        QAdapterModel.from_pretrained(output, str(local_run / "base"))
        weights = _weights(output)
        assert _same(weights, old_weights) or (reached == 6 and _same(weights, _weights(newest)))
    _finish(fork_server, local_run, output, tmp_path / "resumed.log", 6)


def test_resume_passes_over_a_checkpoint_cut_short(tmp_path):
    """A newest checkpoint without a readable trainer_state.json (killed while checkpointing) is
    passed over, with a warning, for the one before it; Trainer alone would resume from it and fail."""
    from qadapter.library.trainer import latest_checkpoint

    for step, state in ((2, "{}"), (10, "{}"), (12, '{"global_step": 1'), (13, None)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if state is not None:
            (path / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    with pytest.warns(UserWarning, match="checkpoint-13 is incomplete"):
        assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert latest_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("moved_before_crash", [0, 1])
def test_files_written_together_are_never_left_new_beside_old(tmp_path, monkeypatch, moved_before_crash):
    """A report and its rendering (`qadapter check`'s check.json and check.md) are one save: a crash
    between the two renames is finished by the next reader, so the pair is both old or both new."""
    atomic.write_texts(tmp_path, {"check.json": "old json", "check.md": "old markdown"})
    (tmp_path / "notes.txt").write_text("mine")
    _die_after_renames(monkeypatch, moved_before_crash)
    with pytest.raises(SystemExit):
        atomic.write_texts(tmp_path, {"check.json": "new json", "check.md": "new markdown"})
    monkeypatch.undo()
    atomic.recover(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "check.json": "new json", "check.md": "new markdown", "notes.txt": "mine"}


def test_an_unfinished_runs_output_names_its_newest_checkpoint(tmp_path):
    """Loading the output of a run stopped before its final save says what it holds: checkpoints,
    the newest by step (checkpoint-10 after checkpoint-9), and how to finish the run."""
    from qadapter.library.saved import read_adapter_config

    for step in (2, 9, 10):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    with pytest.raises(AdapterLoadError, match=r"a run not finished: `qadapter train --resume` finishes it, or load "
                                               r"a checkpoint \(.*checkpoint-10\)"):
        read_adapter_config(tmp_path)


def test_loading_an_adapter_leaves_the_global_random_generator_as_it_was(tmp_path):
    """Loading draws nothing from the caller's seeded generator: PEFT initializes each LoRA at random
    before the saved weights replace it, which would shift the caller's next samples or dropout."""
    make_model().save_pretrained(tmp_path / "adapter")
    base = tiny_causal_lm("llama")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    QAdapterModel.from_pretrained(tmp_path / "adapter", base)
    assert torch.equal(torch.get_rng_state(), state)
