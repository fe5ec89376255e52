"""Build script. Plain metadata lives in pyproject.toml; this file exists for the optional
compiled CUDA extension ``qadapter_kernels._C`` (see csrc/), which is added when a CUDA build of
torch and nvcc are present. Installing without CUDA, nvcc or a GPU always succeeds.

Unset, ``QADAPTER_BUILD_CUDA`` builds the extension where the toolchain is present and installs
without it (saying why) where its build fails; ``QADAPTER_BUILD_CUDA=1`` requires the extension (the
install fails if it cannot be built), ``QADAPTER_BUILD_CUDA=0`` skips it. ``TORCH_CUDA_ARCH_LIST``
picks the GPU architectures (default: every one the kernels support that the installed nvcc
targets, ``qadapter_kernels/toolchain/cuda_archs.py``);
the list is recorded beside the extension (``_C_archs.txt``), and a GPU it does not cover gets a
just-in-time build for itself instead.
Build against the installed torch: ``pip install --no-build-isolation``.

The CUDA sources travel inside the package (``qadapter_kernels/csrc`` in the wheel), so an install
without the compiled extension can still build it just in time on a GPU machine
(``python -m qadapter_kernels.toolchain.build_cuda``).
"""

import os
import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CUDA_ARCHS = runpy.run_path(str(ROOT / "qadapter_kernels" / "toolchain" / "cuda_archs.py"))
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp", ".c")


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package (qadapter_kernels/csrc) for the just-in-time build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "qadapter_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / "csrc").iterdir()):
            if source.suffix in SOURCE_SUFFIXES:
                shutil.copyfile(source, target / source.name)


def _cuda_toolchain() -> str:
    """Empty if the sources, a CUDA build of torch and nvcc are here, else why the extension cannot be built."""
    if not (ROOT / "csrc" / "binding.cpp").is_file():
        return "csrc/ is not in this source tree"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as exc:
        return f"torch is not importable in the build environment ({exc}); use --no-build-isolation"
    if torch.version.cuda is None:
        return "torch is a CPU build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return ""


def _extension_args() -> dict:
    mode = os.environ.get("QADAPTER_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"QADAPTER_BUILD_CUDA must be 0 or 1; got {mode!r}")
    if mode == "0":
        return {"cmdclass": {"build_py": BuildPyWithSources}}
    missing = _cuda_toolchain()
    if missing:
        if mode == "1":
            raise SystemExit(f"QADAPTER_BUILD_CUDA=1 but the CUDA extension cannot be built: {missing}")
        print(f"qadapter-kernels: building without the CUDA extension: {missing}")
        return {"cmdclass": {"build_py": BuildPyWithSources}}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHS["arch_list"](CUDA_ARCHS["nvcc_version"](nvcc)))

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu")) + ["csrc/binding.cpp"]
    ext = CUDAExtension(
        "qadapter_kernels._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        optional=mode != "1",
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": recording_archs(BuildExtension.with_options(use_ninja=True)),
                                               "build_py": BuildPyWithSources}}


def recording_archs(build_ext):
    """``build_ext`` that writes the arch list beside each compiled extension (``_C_archs.txt``, where
    ``_cuda.image_status`` compares it with the GPU's capability), and installs without an optional
    extension whose build fails (torch's builder raises errors setuptools' ``optional`` does not catch)."""

    class BuildExtensionRecordingArchs(build_ext):
        def run(self):
            self.built = []
            super().run()
            for extension in self.built:  # after the run: an in-place build's path is the source tree's
                target = Path(self.get_ext_fullpath(extension.name)).with_name("_C_archs.txt")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(os.environ.get("TORCH_CUDA_ARCH_LIST", "") + "\n")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not ext.optional:
                    raise
                print(f"qadapter-kernels: installing without the CUDA extension {ext.name}: its build failed ({exc}); "
                      f"build it later with python -m qadapter_kernels.toolchain.build_cuda, or set "
                      f"QADAPTER_BUILD_CUDA=1 to make a failed build fail the install")
                return
            self.built.append(ext)

    return BuildExtensionRecordingArchs


if __name__ == "__main__":  # as pip's build backend runs it; a test imports the helpers above
    setup(**_extension_args())
