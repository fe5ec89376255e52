"""bitsandbytes for the GPU machine, which has neither it nor a network: carried with the tree.

The wheel holds a native library per CUDA, ROCm and XPU release (125 MB installed); the GPU
machine's torch is built for CUDA 13.0, so the copy keeps the Python package, the CUDA 13.0 library
(about 4 MB; bitsandbytes also takes it for a later 13.x runtime), the CPU library (64 KB, for the
CPU dry run) and the package's metadata (transformers looks bitsandbytes up by its distribution
metadata before it quantizes anything). It goes into an ignored folder, ``bench/carry/site``, which
bench/gpu.sh puts first on ``PYTHONPATH`` when it is there::

    python -m bench.carry                      # builds bench/carry/site from the installed bitsandbytes
    python -m bench.carry --check bench/carry  # what bench/gpu.sh runs: imported from there, quantizes

The library needs ``libcudart``, ``libcublas`` and ``libcublasLt`` of CUDA 13, which the CUDA build of
torch loads before it (``import torch`` first: bitsandbytes does).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT = ROOT / "carry"
LIMIT = 16 * 2**20  # it travels with the working tree to every GPU run: small, or refused
NF4_TOLERANCE = 0.15  # NF4's relative RMS error on normal weights, blocks of 64, is about 0.1


def native_libraries(package: Path) -> list[Path]:
    return sorted(package.glob("libbitsandbytes_*.so")) + sorted(package.glob("libbitsandbytes_*.dll"))


def build(out: Path, cuda: str = "130") -> Path:
    """Copies the installed bitsandbytes into ``out/site``, keeping only the CUDA ``cuda`` and the
    CPU native libraries; returns the site directory. Replaces what was there."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("bitsandbytes")
    except importlib.metadata.PackageNotFoundError as exc:
        raise SystemExit("bitsandbytes is not installed here: pip install 'qadapter-kernels[quant]'") from exc
    package = Path(dist.locate_file("bitsandbytes"))
    keep = {f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so"}
    missing = keep - {p.name for p in native_libraries(package)}
    if missing:
        raise SystemExit(f"the installed bitsandbytes {dist.version} lacks {sorted(missing)}")
    site = out / "site"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(package, site / "bitsandbytes", ignore=lambda directory, names: [
        n for n in names if n == "__pycache__" or (n.startswith("libbitsandbytes_") and n not in keep)])
    # The .dist-info directory: METADATA (the version transformers reads) and the licenses.
    info = Path(dist.locate_file(next(f for f in dist.files if f.name == "METADATA"))).parent
    shutil.copytree(info, site / info.name, ignore=shutil.ignore_patterns("RECORD", "INSTALLER", "REQUESTED"))
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    if size > LIMIT:
        raise SystemExit(f"{site} holds {size / 2**20:.1f} MiB, more than the {LIMIT / 2**20:.0f} MiB allowed")
    print(f"bitsandbytes {dist.version} -> {site}: {size / 2**20:.1f} MiB, native libraries "
          f"{', '.join(p.name for p in native_libraries(site / 'bitsandbytes'))}")
    return site


def check(carried: Path | None) -> int:
    """Imports bitsandbytes (from ``carried/site`` when given: it must come from there), says which
    native library it loaded (on CUDA it must be a CUDA build), checks that transformers finds it and
    can quantize with it (accelerate), and round-trips a random matrix through NF4 on the device."""
    import torch
    from transformers.utils import is_accelerate_available, is_bitsandbytes_available

    try:
        import bitsandbytes
    except ImportError as exc:
        print(f"PROBLEM: bitsandbytes does not import ({exc}): build {DEFAULT} with python -m bench.carry "
              "and carry it with the tree")
        return 1
    import bitsandbytes.functional as F
    from bitsandbytes.cextension import BNBNativeLibrary, lib

    location = Path(bitsandbytes.__file__).resolve().parent
    problems = []
    if carried is not None and (carried / "site").resolve() not in location.parents:
        problems.append(f"bitsandbytes came from {location}, not from {carried / 'site'}")
    native = getattr(getattr(lib, "_lib", None), "_name", None) if isinstance(lib, BNBNativeLibrary) else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not getattr(lib, "compiled_with_cuda", False):
        problems.append(f"no CUDA library loaded for CUDA {torch.version.cuda} (native: {native})")
    if not is_bitsandbytes_available():
        problems.append("transformers does not find bitsandbytes (its metadata is missing?)")
    if not is_accelerate_available():
        problems.append("accelerate is missing: transformers quantizes with bitsandbytes only with it")
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    error = float((F.dequantize_4bit(packed, state).float() - weight.float()).norm() / weight.float().norm())
    if not error < NF4_TOLERANCE:
        problems.append(f"NF4 round trip error {error:.3f} (at most {NF4_TOLERANCE})")
    print(f"bitsandbytes {bitsandbytes.__version__} from {location}; native library {native}; device {device}; "
          f"NF4 round trip relative error {error:.3f}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.carry", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT, help="where site/ goes (default: %(default)s)")
    parser.add_argument("--cuda", default="130", help="the CUDA release whose library is kept (default: 130, 13.0)")
    parser.add_argument("--check", type=Path, nargs="?", const=DEFAULT, metavar="DIR",
                        help="check instead of building: bitsandbytes imports from DIR/site and quantizes")
    args = parser.parse_args(argv)
    if args.check is not None:
        return check(args.check)
    build(args.out, args.cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
