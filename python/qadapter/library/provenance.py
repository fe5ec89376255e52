"""What an adapter is: the record saved beside its weights (``provenance.json``).

It names the training data (path or hub name, a content hash, rows read, kept and skipped), every
training option, the package and library versions, the base (name, fingerprint, how it was
quantized), the parent adapter (reserved), the final training metrics and the creation time.

The record is written by :meth:`QAdapterModel.write_adapter`, so it goes through the same staged,
atomic save as the adapter's other files. It describes the adapter and is never needed to use it:
a missing or unreadable record is reported (:func:`read_provenance`) and the adapter still loads.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PROVENANCE_NAME = "provenance.json"
PROVENANCE_VERSION = 1
LIBRARIES = ("qadapter-kernels", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors")


def versions() -> dict[str, str | None]:
    """The Python version and each library's installed version (None where it is not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def rows_hash(rows: list[Any]) -> str:
    """sha256 of the rows as canonical JSON (sorted keys): the same rows give the same hash in any file format.
    A lone surrogate (a row skipped for it, or in a column not trained on) is hashed as its code point, not refused."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_identity(source: Any, rows: list[Any] | None = None, summary: Any = None) -> dict:
    """The identity of a training set: where it came from (a path or a hub name; None for rows given
    in memory), the sha256 of the file (local files), the sha256 of its rows as canonical JSON, and
    from ``summary`` (:class:`qadapter.library.data.DataSummary`) the rows read, kept, truncated and
    skipped with their reasons."""
    kind, name, sha = "memory", None, None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            kind, name, sha = "file", str(path), file_hash(path)
        else:
            kind, name = "hub", str(source)
    identity: dict[str, Any] = {"kind": kind, "source": name, "file_sha256": sha,
                                "rows_sha256": rows_hash(rows) if rows is not None else None}
    if summary is not None:
        identity.update(rows=summary.rows, kept=summary.kept, truncated=summary.truncated,
                        skipped=sum(summary.skipped.values()), skipped_reasons=dict(summary.skipped))
    elif rows is not None:
        identity.update(rows=len(rows), kept=None, truncated=None, skipped=None, skipped_reasons={})
    return identity


def build(model, record: dict | None = None) -> dict:
    """The provenance of ``model`` (a QAdapterModel) now: its base and adapter settings, the versions,
    the creation time, and what training put in ``record`` (``data``, ``training``, ``metrics``)."""
    record = record or {}
    config = model.adapter_config()
    return {
        "provenance_version": PROVENANCE_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": {"name": config["base_model"], "fingerprint": config["base_fingerprint"],
                 "quantization": config.get("quantization")},
        "parent_adapter": record.get("parent_adapter"),
        "adapter": {"loss": config["loss"], "lora": config["lora"]},
        "data": record.get("data"),
        "eval_data": record.get("eval_data"),
        "training": record.get("training"),
        "metrics": record.get("metrics"),
        "versions": versions(),
    }


def write(directory: Path, provenance: dict) -> None:
    (Path(directory) / PROVENANCE_NAME).write_text(json.dumps(_canonical(provenance), indent=2) + "\n",
                                                   encoding="utf-8")


def trained_on(adapter: str | Path, data: Any, rows: list[Any]) -> bool:
    """Whether ``data`` (read as ``rows``) is what the adapter in ``adapter`` was trained on, by the
    recorded sha256 of its file or of its rows: held-out measures on it would overstate what the
    adapter learned."""
    record, _ = read_provenance(adapter)
    trained = (record or {}).get("data") or {}
    path = Path(str(data))
    if trained.get("file_sha256") and path.is_file() and file_hash(path) == trained["file_sha256"]:
        return True
    return bool(trained.get("rows_sha256")) and rows_hash(rows) == trained["rows_sha256"]


def read_provenance(path: str | Path) -> tuple[dict | None, str | None]:
    """``(record, None)``, or ``(None, problem)`` when the adapter directory ``path`` has no readable
    record: missing, not JSON, or not a provenance object."""
    file = Path(path) / PROVENANCE_NAME
    if not file.is_file():
        return None, f"{PROVENANCE_NAME} is missing: the adapter's origin is unknown"
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{file} is corrupted: {exc}"
    if not isinstance(record, dict) or "provenance_version" not in record:
        return None, f"{file} is not a provenance record (no 'provenance_version')"
    return record, None
