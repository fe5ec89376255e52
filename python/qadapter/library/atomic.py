"""Saving an adapter into a directory without losing anything that is already there.

An adapter is a few files (the LoRA weights, PEFT's config, ours). Saving writes the complete new
set into a hidden staging directory inside the target, marks the set complete, then renames each
file over its old version. Only the adapter's own files are replaced; everything else in the
directory (the trainer's checkpoints, the user's files) stays. If the process dies:

- before the mark: the staging directory is incomplete and is dropped by the next save (a load
  leaves it: it may be a save still writing); the previous adapter is untouched;
- after the mark: the next save or load finishes the renames (:func:`recover`), so the directory
  always ends up holding one whole adapter, old or new, never a mix. An exception there keeps the
  staged set for it; a Ctrl-C finishes the renames before it stops the save.

A writer holds a lock on a file in its staging directory while it writes (released when it ends,
or dies): a save never drops another process's staging directory while that one still writes. A
whole run (``qadapter train``) holds its output directory the same way (:func:`hold`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

STAGING_PREFIX = ".qadapter-saving-"
COMPLETE = ".complete"
WRITER = ".qadapter-writer"  # the lock file of a staging directory's writer, or of a run's output directory


def _locked(file) -> bool:
    """Takes an exclusive lock on an open file without waiting: False where another holder has it
    (True where the platform or the file system has no ``flock``: there is nothing to tell)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return True
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks (some network mounts): saving goes on as without them
        return True
    return True


def _written_now(directory: Path) -> bool:
    """Whether a writer still holds ``directory``'s lock file."""
    try:
        with open(directory / WRITER, "a") as file:
            return not _locked(file)
    except OSError:  # none (a save from before the lock, or one that died before it), or unreadable
        return False


def hold(path: str | os.PathLike):
    """Holds the directory ``path`` (made if missing) for this process alone, for as long as the
    returned file stays open (it closes with the process, one that dies too): a second writer asking
    meanwhile gets :class:`OutputDirectoryError`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    file = open(path / WRITER, "a")  # noqa: SIM115 -- the caller holds it open
    if not _locked(file):
        file.close()
        raise OutputDirectoryError(f"{path} is being written by another process (a run with the same output "
                                   "directory): wait for it to end, or choose another directory")
    return file


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` at ``path``, written beside it and renamed over it: a reader (or a run killed
    mid-write) sees the old file or the new one, never half of one."""
    _replace_with(path, lambda f: f.write(text.encode("utf-8")))


def _replace_with(path: str | os.PathLike, write: Callable) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk and renamed over it
    (the folder synced too), so that a crash, even a power loss, leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _plain_file_mode())  # not mkstemp's owner-only 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """``data`` as indented JSON at ``path``, atomically (:func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str):
    """The JSON value in the file ``path``; a file that is not JSON is a ValueError naming ``what``.
    A leading byte-order mark (a hand-edited file from a Windows editor) is not data, as in the data files."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from exc


def write_texts(directory: str | os.PathLike, texts: Mapping[str, str]) -> None:
    """Several text files (``name: text``) in ``directory`` as one save (:func:`save_files`): files
    that belong together (a report and its rendering) are never left a new one beside an old one.
    Anything else in the directory stays; an interrupted write is finished or dropped by the next
    save, load or :func:`recover` there."""
    def write(staging: Path) -> None:
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")

    save_files(directory, write, is_ours=lambda _: True)


def pyplot(path: str | os.PathLike):
    """matplotlib's pyplot (non-interactive) to draw the figure for ``path``; None where matplotlib is
    not installed, with a warning naming the figure not drawn and the extra that draws it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(f"{Path(path).name} is not drawn: matplotlib is not installed "
                      f"(pip install \"qadapter-kernels[plot]\")", stacklevel=2)
        return None
    return plt


def save_figure(figure, path: str | os.PathLike, **savefig_options) -> None:
    """A matplotlib figure as PNG at ``path``, drawn beside it and renamed over it."""
    _replace_with(path, lambda f: figure.savefig(f, format="png", **savefig_options))


def _plain_file_mode() -> int:
    """The mode ``open`` gives a new file under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class OutputDirectoryError(ValueError):
    """The target path cannot receive an adapter (a file, or a directory of other things)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover(path: str | os.PathLike, *, reading: bool = False) -> None:
    """Finishes or drops a save that was interrupted in ``path`` (see the module docstring). A reader
    (``reading``) finishes one marked complete, as its writer would, and leaves an unmarked one: from
    where it reads, a save that died and one still writing look the same."""
    path = Path(path)
    if not path.is_dir():
        return
    for staging in sorted(path.glob(STAGING_PREFIX + "*")):
        if not (staging / COMPLETE).is_file() and (reading or _written_now(staging)):
            continue
        if (staging / COMPLETE).is_file():
            try:
                _move_into(staging, path)
            except OSError as exc:  # what blocks a rename blocks every later save and load here: said
                raise OSError(f"{path}: a save interrupted there cannot be finished ({exc}); move away what "
                              f"blocks it, or remove {staging} to keep the files as they are") from exc
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(staging: Path, path: Path) -> None:
    try:
        items = sorted(staging.iterdir())
    except FileNotFoundError:  # a reader finished this save (a complete one) and removed its staging
        return
    for item in items:
        if item.name not in (COMPLETE, WRITER):
            try:
                os.replace(item, path / item.name)
            except FileNotFoundError:  # moved meanwhile by a reader finishing the same save
                continue
    _fsync_dir(path)


def check_target(path: Path, *, is_ours: Callable[[Path], bool], overwrite: bool) -> None:
    """Refuses a regular file, and a non-empty directory that is not ours unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise OutputDirectoryError(f"{path} is a file, not a directory: an adapter is saved as a directory")
    if path.is_dir() and not overwrite and any(p.name != WRITER for p in path.iterdir()) and not is_ours(path):
        raise OutputDirectoryError(
            f"{path} is not empty and holds no Q-Adapter adapter or checkpoint: refusing to write into it "
            "(choose another directory, or allow it explicitly: save_pretrained(..., overwrite=True) / qadapter train --overwrite; "
            "only the adapter's own files are ever replaced)"
        )


def save_files(path: str | os.PathLike, write: Callable[[Path], Iterable[str] | None], *,
               is_ours: Callable[[Path], bool], overwrite: bool = False) -> None:
    """Runs ``write(staging_dir)``, then moves what it wrote into ``path`` file by file, recoverably."""
    path = Path(path)
    check_target(path, is_ours=is_ours, overwrite=overwrite)
    path.mkdir(parents=True, exist_ok=True)
    recover(path)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=path))
    writer = open(staging / WRITER, "a")  # noqa: SIM115 -- held while this save writes
    _locked(writer)
    try:
        write(staging)
        for item in staging.iterdir():
            if item.is_file():
                with open(item, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(item, _plain_file_mode())  # whatever mode the writer chose: readable by whoever serves it
    except BaseException:
        writer.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Marked complete, the staged set is kept until every file is in place: a failure from here on
    # leaves it for recover() to finish, and a Ctrl-C finishes the few renames before it stops.
    try:
        (staging / COMPLETE).touch()
        _fsync_dir(staging)
        _move_into(staging, path)
    except KeyboardInterrupt:
        (staging / COMPLETE).touch()
        _move_into(staging, path)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        writer.close()
    shutil.rmtree(staging, ignore_errors=True)
