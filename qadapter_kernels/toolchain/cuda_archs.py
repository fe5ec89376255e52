"""The GPU architectures the CUDA extension is built for, and whether a build runs on a device.

Kept free of imports beyond the standard library: ``setup.py`` reads it before anything is built.
An install builds for every generation the kernels support that nvcc can target, consumer parts
included, with PTX for the newest so that later GPUs compile it at load time; the just-in-time
build on a GPU machine builds for that GPU (its own capability, with PTX).

A build runs on a device when it holds a cubin of the device's major version and a minor version
no higher than the device's (sm_80 runs on 8.6 and 8.9; sm_90a only on 9.0 itself), or PTX of a
capability no higher than the device's, which the driver compiles at load time.

``python -m qadapter_kernels.toolchain.cuda_archs`` prints the ``TORCH_CUDA_ARCH_LIST`` for the GPU at hand
(its capability, with PTX), or without one the default list for the nvcc at hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

# (compute capability, first CUDA release whose nvcc targets it)
SUPPORTED = (("8.0", (11, 0)), ("8.6", (11, 1)), ("8.9", (11, 8)), ("9.0", (11, 8)), ("10.0", (12, 8)),
             ("12.0", (12, 8)))

_ENTRY = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def nvcc_version(nvcc: str | None = None) -> tuple[int, int] | None:
    """``(major, minor)`` of nvcc's CUDA release, or None when there is no nvcc."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def default_archs(cuda: tuple[int, int] | None) -> list[str]:
    """The capabilities to build for with this CUDA release (all of them when it is unknown)."""
    return [arch for arch, since in SUPPORTED if cuda is None or cuda >= since]


def arch_list(cuda: tuple[int, int] | None) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for this CUDA release: every supported capability, PTX for the last."""
    archs = default_archs(cuda)
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def device_arch_list(capability: tuple[int, int], cuda: tuple[int, int] | None = None) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for one device: its capability with PTX. When nvcc (CUDA release
    ``cuda``) is known to be too old for it, the newest supported capability below it, with PTX,
    which the driver compiles for the device at load time."""
    arch = f"{capability[0]}.{capability[1]}"
    since = dict(SUPPORTED).get(arch)
    if cuda is not None and since is not None and cuda < since:
        older = [a for a, s in SUPPORTED if cuda >= s and _capability(a) <= tuple(capability)]
        arch = older[-1] if older else arch
    return arch + "+PTX"


def _capability(arch: str) -> tuple[int, int]:
    major, minor = arch.split(".")
    return int(major), int(minor)


def parse_arch_list(text: str) -> list[tuple[int, int, str, bool]] | None:
    """``[(major, minor, variant, ptx)]`` of a ``TORCH_CUDA_ARCH_LIST`` ("8.0;8.6 9.0a 12.0+PTX";
    variant "a", "f" or ""), or None when it holds something else (torch's named architectures,
    "native"): then nothing can be said about it here."""
    entries = [e for e in re.split(r"[;\s]+", text.strip()) if e]
    parsed = [_ENTRY.match(e) for e in entries]
    if not entries or not all(parsed):
        return None
    return [(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4) is not None) for m in parsed]


def gencode_flags(text: str) -> list[str]:
    """nvcc ``-gencode`` flags of an arch list (a cubin of each entry, PTX of each ``+PTX`` one);
    [] when the list cannot be parsed (torch then reads TORCH_CUDA_ARCH_LIST itself)."""
    entries = parse_arch_list(text)
    if entries is None:
        return []
    flags = []
    for major, minor, variant, ptx in entries:
        code = f"{major}{minor}{variant}"
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    return flags


def covers(text: str, capability: tuple[int, int]) -> tuple[bool, str]:
    """Whether a build for the arch list ``text`` runs on a device of ``capability``, and if not why."""
    entries = parse_arch_list(text)
    major, minor = capability
    if entries is None:
        return True, f"cannot tell whether {text!r} covers {major}.{minor}"
    for e_major, e_minor, variant, ptx in entries:
        if variant == "a":  # architecture-specific: that capability only, cubin and PTX alike
            if (e_major, e_minor) == (major, minor):
                return True, ""
            continue
        if e_major == major and e_minor <= minor:
            return True, ""
        if ptx and (e_major, e_minor) <= (major, minor):
            return True, ""
    return False, (f"it was built for {text!r}, which holds no cubin for compute capability {major}.{minor} "
                   f"(same major version, minor <= {minor}) and no PTX at or below it")


def main() -> int:
    """Prints the arch list for the visible GPU, else the default one for the nvcc at hand."""
    try:
        import torch

        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no torch, no driver: the default list
        capability = None
    cuda = nvcc_version()
    print(device_arch_list(capability, cuda) if capability else arch_list(cuda))
    return 0


if __name__ == "__main__":
    sys.exit(main())
