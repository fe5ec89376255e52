"""Adapters on the hub: a repository ``owner/name[@revision]`` loads wherever a folder does, and
``push_to_hub`` uploads what loads back. No hub is reachable here: the hub's side is its local
cache, filled as a download fills it and read with huggingface_hub offline, and the upload is
caught at ``HfApi`` and written into that cache."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
huggingface_hub = pytest.importorskip("huggingface_hub")
from helpers import perturb_adapter, save_tiny_base  # noqa: E402
from qadapter.cli import main  # noqa: E402
from qadapter.library.adapter_set import AdapterSet  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402
from qadapter.library.saved import AdapterLoadError, locate_adapter  # noqa: E402


class FakeHub:
    """The hub as its local cache: each publish is a commit (a snapshot folder) that ``revision`` points to."""

    def __init__(self, cache):
        self.cache, self.commits = cache, 0

    def publish(self, repo_id: str, folder, revision: str = "main") -> str:
        self.commits += 1
        sha = f"{self.commits:040x}"
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(sha)
        return sha


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return FakeHub(tmp_path / "hub-cache")


@pytest.fixture
def base(tmp_path):
    save_tiny_base(tmp_path / "base")
    return tmp_path / "base"


def trained(base, seed: int) -> QAdapterModel:
    model = QAdapterModel.from_base(str(base), lora_dropout=0.0)
    perturb_adapter(model, seed=seed)
    return model


def next_token_logprobs(model: QAdapterModel) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        return model.policy(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]


def test_a_hub_repository_loads_as_its_folder_and_a_revision_pins_it(tmp_path, hub, base):
    first, second = trained(base, seed=1), trained(base, seed=2)
    first.save_pretrained(tmp_path / "v1")
    second.save_pretrained(tmp_path / "v2")
    sha1 = hub.publish("me/tldr", tmp_path / "v1")
    hub.publish("me/tldr", tmp_path / "v2")  # main moves on

    latest = QAdapterModel.from_pretrained("me/tldr")
    pinned = QAdapterModel.from_pretrained(f"me/tldr@{sha1}")
    torch.testing.assert_close(next_token_logprobs(QAdapterModel.from_pretrained("me/tldr", revision=sha1)),
                               next_token_logprobs(first))  # transformers' spelling
    with pytest.raises(ValueError, match="has one already"):
        QAdapterModel.from_pretrained(f"me/tldr@{sha1}", revision="main")
    torch.testing.assert_close(next_token_logprobs(latest), next_token_logprobs(second))
    torch.testing.assert_close(next_token_logprobs(pinned), next_token_logprobs(first))
    assert not torch.allclose(next_token_logprobs(latest), next_token_logprobs(pinned))

    policies = AdapterSet.from_pretrained({"new": "me/tldr", "old": f"me/tldr@{sha1}"})
    assert policies.names == ["new", "old"]


def test_a_pinned_revision_in_the_cache_loads_offline_where_the_hub_client_asks_the_hub(tmp_path, hub, base,
                                                                                      monkeypatch):
    """huggingface_hub 1.x, offline, asks the hub for a pinned revision's file list (and fails) where
    its cache holds the snapshot: the cache's snapshot is taken."""
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    trained(base, seed=1).save_pretrained(tmp_path / "v1")
    sha = hub.publish("me/tldr", tmp_path / "v1")
    download = huggingface_hub.snapshot_download

    def as_hub_1(*args, local_files_only=False, **kwargs):
        if not local_files_only:
            raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models/me/tldr/tree: offline mode")
        return download(*args, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", as_hub_1)
    assert locate_adapter(f"me/tldr@{sha}") == tmp_path / "hub-cache" / "models--me--tldr" / "snapshots" / sha
    with pytest.raises(AdapterLoadError, match=r"at revision '0{40}': OfflineModeIsEnabled: Cannot reach"):
        locate_adapter("me/tldr@" + "0" * 40)


def test_what_cannot_be_found_is_named(tmp_path, hub, base):
    with pytest.raises(AdapterLoadError, match=r"'me/missing': no such folder here, and the hub gave no repository"):
        locate_adapter("me/missing")
    with pytest.raises(AdapterLoadError, match=r"at revision 'v9'"):
        trained(base, seed=1).save_pretrained(tmp_path / "a")
        hub.publish("me/a", tmp_path / "a")
        locate_adapter("me/a@v9")
    with pytest.raises(AdapterLoadError, match=r"'\./typo/adapter': no such folder$"):  # not a repository name
        locate_adapter("./typo/adapter")
    with pytest.raises(AdapterLoadError, match=r"'me/missing': no such folder$"):  # a Path is a folder, never a repository
        locate_adapter(Path("me/missing"))
    plain = tmp_path / "plain-peft"
    plain.mkdir()
    (plain / "adapter_config.json").write_text("{}")
    hub.publish("me/plain", plain)
    with pytest.raises(AdapterLoadError, match="holds no Q-Adapter"):
        QAdapterModel.from_pretrained("me/plain")
    # A folder is a folder, whatever its name looks like.
    local = tmp_path / "me@v1"
    shutil.copytree(tmp_path / "a", local)
    assert locate_adapter(str(local)) == local


def test_push_to_hub_uploads_what_loads_back(tmp_path, hub, base, monkeypatch):
    pushed = {}

    def upload_folder(self, *, repo_id, folder_path, commit_message, revision=None):
        pushed.update(files=sorted(p.name for p in Path(folder_path).iterdir()),
                      card=(Path(folder_path) / "README.md").read_text())
        sha = hub.publish(repo_id, folder_path, revision or "main")
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **_: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = trained(base, seed=3)
    commit = model.push_to_hub("me/pushed")
    assert commit.commit_url.startswith("https://huggingface.co/me/pushed/commit/")
    assert pushed["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "provenance.json",
                               "qadapter_config.json"]
    assert "library_name: qadapter-kernels" in pushed["card"] and "from_pretrained('me/pushed')" in pushed["card"]
    torch.testing.assert_close(next_token_logprobs(QAdapterModel.from_pretrained("me/pushed")),
                               next_token_logprobs(model))

    model.save_pretrained(tmp_path / "level1")
    stacked = QAdapterModel.from_base(on=str(tmp_path / "level1"))
    with pytest.raises(ValueError, match=r"stack level\(s\) \[1\] of this adapter are local folders"):
        stacked.push_to_hub("me/stacked")


def test_a_stack_over_hub_levels_is_pushed_and_found_on_another_machine(tmp_path, hub, base, monkeypatch):
    """A level taken from the hub is recorded pinned to its commit: the pushed child finds it there
    where neither its recorded path nor its relative one exists (another machine's cache)."""
    trained(base, seed=1).save_pretrained(tmp_path / "level1")
    sha = hub.publish("me/level1", tmp_path / "level1")
    child = QAdapterModel.from_base(on="me/level1", lora_dropout=0.0)
    perturb_adapter(child, seed=2)
    assert child.stack[0].hub == f"me/level1@{sha}"
    assert child.adapter_config(tmp_path / "anywhere")["stack"][0]["relative_path"] is None  # in the cache, not beside
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **_: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, *, repo_id, folder_path, **_:
                        shutil.copytree(folder_path, tmp_path / "uploaded"))
    child.push_to_hub("me/level2")
    expected = next_token_logprobs(child)

    from huggingface_hub import constants

    shutil.rmtree(hub.cache)  # another machine: a fresh cache that the hub fills
    other = FakeHub(tmp_path / "other-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(other.cache))
    assert other.publish("me/level1", tmp_path / "level1") == sha
    other.publish("me/level2", tmp_path / "uploaded")
    loaded = QAdapterModel.from_pretrained("me/level2")
    assert loaded.stack[0].path.startswith(str(other.cache))
    torch.testing.assert_close(next_token_logprobs(loaded), expected)


def test_commands_take_a_hub_repository(tmp_path, hub, base, monkeypatch, capsys):
    trained(base, seed=1).save_pretrained(tmp_path / "a")
    hub.publish("me/a", tmp_path / "a")
    sha = hub.publish("me/a", tmp_path / "a")  # main moves to a second commit of the same files
    assert main(["info", "me/a"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"adapter: me/a@{sha} (the hub's; cached at ") and "base: " in out
    assert main(["generate", "--adapter", "me/a", "--prompt", "hello", "--max-new-tokens", "2"]) == 0
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hi {i}", "chosen": "yes", "rejected": "no"}) + "\n"
                            for i in range(2)))
    with pytest.raises(SystemExit) as exit_:  # the report would land in the hub cache
        main(["check", "me/a", "--data", str(data)])
    assert exit_.value.code == 2 and "--output" in capsys.readouterr().err
    main(["check", "me/a", "--data", str(data), "--output", str(tmp_path / "report"), "--probe-items", "2",
          "--passages", "0"])
    assert json.loads((tmp_path / "report" / "check.json").read_text())["adapter"] == f"me/a@{sha}"


def test_train_pushes_the_saved_adapter_once_at_the_end(tmp_path, hub, base, monkeypatch, capsys):
    uploads = []

    def upload_folder(self, *, repo_id, folder_path, commit_message, revision=None):
        uploads.append(repo_id)
        sha = hub.publish(repo_id, folder_path)
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **_: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello world {i}", "chosen": "the capital", "rejected": "of France"})
                            + "\n" for i in range(4)))
    assert main(["train", "--model", str(base), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--save_steps", "1",
                 "--push_to_hub", "true", "--hub_model_id", "me/trained"]) == 0
    assert uploads == ["me/trained"]  # the adapter, not the checkpoints at each save
    assert "adapter pushed to the hub: https://huggingface.co/me/trained/commit/" in capsys.readouterr().err
    torch.testing.assert_close(next_token_logprobs(QAdapterModel.from_pretrained("me/trained")),
                               next_token_logprobs(QAdapterModel.from_pretrained(tmp_path / "run")))


def test_train_refuses_to_push_a_stack_over_local_levels_before_training(tmp_path, hub, base, capsys):
    trained(base, seed=1).save_pretrained(tmp_path / "level1")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "yes", "rejected": "no"}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--on", str(tmp_path / "level1"), "--data", str(data), "--output", str(tmp_path / "level2"),
              "--push_to_hub", "true", "--hub_model_id", "me/level2"])
    assert exit_.value.code == 2 and "stack level(s) [1] under the new adapter are local folders" in capsys.readouterr().err
    assert not (tmp_path / "level2").exists()


def test_an_adapter_on_a_local_base_from_another_machine_asks_for_the_base(tmp_path, hub, base):
    model = trained(base, seed=1)
    model.save_pretrained(tmp_path / "a")
    hub.publish("me/a", tmp_path / "a")
    moved = shutil.move(base, tmp_path / "elsewhere")  # the recorded folder is the uploader's
    with pytest.raises(AdapterLoadError, match=r"trained on the local base .*base, which is not here.*--base-model"):
        QAdapterModel.from_pretrained("me/a")
    torch.testing.assert_close(next_token_logprobs(QAdapterModel.from_pretrained("me/a", str(moved))),
                               next_token_logprobs(model))


def test_a_base_that_can_only_be_a_folder_and_is_missing_is_named_before_transformers():
    """An absolute path, or a name no hub repository can have, names a folder: its absence is said
    as such (transformers would answer with a repository-name error); a hub name is left to the hub."""
    from qadapter.library.defaults import load_base, names_missing_folder

    for name in ("/nonexistent/base", "./nope", "../a/b/c"):
        assert names_missing_folder(name)
        with pytest.raises(FileNotFoundError, match=f"no model folder at {name}"):
            load_base(name)
    assert not names_missing_folder("me/base") and not names_missing_folder("smollm2-135m-instruct")


def test_train_on_a_hub_parent_asks_the_hub_once(tmp_path, hub, base, monkeypatch):
    """``train --on owner/name`` finds its parent once: the checks before loading and the model use
    the same commit, and an offline machine waits for the hub's retries once, not three times."""
    trained(base, seed=1).save_pretrained(tmp_path / "level1")
    sha = hub.publish("me/level1", tmp_path / "level1")
    lookups = []
    download = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: lookups.append(repo_id) or download(repo_id, **kw))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "yes", "rejected": "no"}) + "\n")
    assert main(["train", "--on", "me/level1", "--data", str(data), "--output", str(tmp_path / "level2"),
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true"]) == 0
    assert lookups == ["me/level1"]
    parent = json.loads((tmp_path / "level2" / "qadapter_config.json").read_text())["stack"][-1]
    assert parent["hub"] == f"me/level1@{sha}"


def test_a_base_name_close_to_the_default_is_named_in_the_error(monkeypatch):
    """A name the hub does not answer for that is one typo from the embedded default says so; any
    other hub name gets the hub's error alone."""
    import transformers
    from qadapter.library.defaults import DEFAULT_MODEL, load_base

    def unreachable(name, *args, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(OSError, match=f"did you mean the embedded default model, '{DEFAULT_MODEL}'") as exc:
        load_base(DEFAULT_MODEL.replace("-instruct", ""))
    assert "couldn't connect" in str(exc.value)
    with pytest.raises(OSError) as exc:
        load_base("someone/some-model")
    assert "did you mean" not in str(exc.value)


def test_the_converted_default_model_is_kept_per_transformers_major_version(tmp_path, monkeypatch):
    """The tokenizer files transformers 5 writes, transformers 4 cannot read: each major version
    converts the embedded default into its own cache folder."""
    import importlib.metadata

    from qadapter.library import defaults

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"gguf")
    installed = importlib.metadata.version
    folders = {}
    for transformers in ("4.56.2", "5.25.0", "5.0.1"):
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name, v=transformers: v if name == "transformers" else installed(name))
        folders[transformers] = defaults._cache_dir(gguf).name
    assert folders["5.25.0"] == folders["5.0.1"] != folders["4.56.2"]
    assert folders["4.56.2"].endswith("-transformers4")


def test_converting_the_default_model_without_gguf_names_the_extra(tmp_path, monkeypatch):
    """transformers reads the GGUF file with the gguf package; without it, its ImportError is no
    ModuleNotFoundError the command line names an extra for. Nothing is written to the cache."""
    import sys

    from qadapter.library import defaults

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(defaults, "gguf_path", lambda: gguf)
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # not installed
    with pytest.raises(ModuleNotFoundError, match=r'needs the gguf package: pip install "qadapter-kernels\[model\]"'):
        defaults.default_model_dir()
    assert not (tmp_path / "cache").exists()


def test_a_model_cache_that_cannot_be_written_says_what_to_set(tmp_path, monkeypatch):
    """A read-only home or cache (here a file where the folder would be): the folder, and QADAPTER_CACHE."""
    from qadapter.library import defaults

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"gguf")
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(defaults, "gguf_path", lambda: gguf)
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "file"))
    with pytest.raises(OSError, match=f"the cache folder {tmp_path / 'file' / 'models'} cannot be written .*: "
                                      "set QADAPTER_CACHE to a writable folder"):
        defaults.default_model_dir()
