"""The package as users get it: a wheel and an sdist, each installed (not editable) into a fresh
virtual environment and used from a directory outside the checkout.

The fresh environments see this environment's dependencies (torch, transformers, ...) through a
``.pth`` line, so only the package itself comes from the built artifact.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".c", ".cu", ".cuh", ".h", ".cpp"))
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="builds and virtual environments: Linux")

CHECK = """
import pathlib, torch, qadapter_kernels as qk
from qadapter_kernels import backends, qadapter_loss
from qadapter_kernels.toolchain.cache import sources_dir
root = pathlib.Path(qk.__file__).parent
assert "site-packages" in str(root), root
shipped = sorted(p.name for p in (root / "csrc").iterdir())
assert shipped == {csrc!r}, shipped
assert sources_dir() == root / "csrc"
g = torch.Generator().manual_seed(0)
h = torch.randn(2, 6, 16, generator=g)
labels = torch.randint(0, 50, (2, 6), generator=g); labels[:, :2] = -100
out = qadapter_loss(h, h + 0.1 * torch.randn(2, 6, 16, generator=g), torch.randn(50, 16, generator=g) / 4, labels)
assert torch.isfinite(out.loss)
print("version", qk.__version__, "| cuda:", backends()["cuda"].reason)
"""


def _run(cmd, **kwargs):
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert run.returncode == 0, f"$ {' '.join(map(str, cmd))}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def _fresh_env(path: Path) -> Path:
    """A virtual environment without this package, whose dependencies come from this one."""
    _run([sys._base_executable, "-m", "venv", "--without-pip", str(path)])
    python = path / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (purelib / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


def _install_and_check(artifact: Path, env: Path, workdir: Path) -> str:
    python = _fresh_env(env)
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
          "--no-build-isolation", "--no-index", str(artifact)], env={**os.environ, "QADAPTER_BUILD_CUDA": "0"})
    out = _run([str(python), "-c", CHECK.format(csrc=CSRC)], cwd=workdir)
    for command in ([str(env / "bin" / "qadapter")], [str(python), "-m", "qadapter"]):
        help_text = _run([*command, "--help"], cwd=workdir)
        assert "usage: qadapter" in help_text and "train" in help_text and "generate" in help_text
    return out


def test_wheel_and_sdist_install_and_run_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist),
          str(ROOT)], env={**os.environ, "QADAPTER_BUILD_CUDA": "0"})
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(ROOT)], cwd=tmp_path)
    wheel, sdist = next(dist.glob("*.whl")), next(dist.glob("*.tar.gz"))
    wheel_files = zipfile.ZipFile(wheel).namelist()
    assert {f"qadapter_kernels/csrc/{name}" for name in CSRC} <= set(wheel_files)
    data = {"qadapter/experiments/task_data.json", "qadapter/evaluation/knowledge_data.json",
            "qadapter/evaluation/general_text.txt", "qadapter/experiments/lm_eval_tasks/qadapter_tldr.yaml",
            "qadapter_kernels/toolchain/cuda_archs.py"}
    assert data <= set(wheel_files), data - set(wheel_files)
    sdist_files = {Path(n).name for n in tarfile.open(sdist).getnames()}
    assert set(CSRC) <= sdist_files and "setup.py" in sdist_files and "LICENSE" in sdist_files
    assert {"qadapter_kernels/py.typed", "qadapter/py.typed"} <= set(wheel_files)  # type hints for checkers
    assert any(".dist-info/" in name and name.endswith("/LICENSE") for name in wheel_files)  # licenses/ from setuptools 77

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for artifact, name in ((wheel, "from-wheel"), (sdist, "from-sdist")):
        out = _install_and_check(artifact, tmp_path / name, outside)
        assert "version 0." in out
        assert "cuda:" in out


def run_extension_builder(tmp_path, build_ext, optional: bool, inplace: bool = False) -> None:
    """setup.py's extension builder over ``build_ext`` (the builder it wraps), for one extension."""
    import runpy

    from setuptools import Distribution, Extension

    helpers = runpy.run_path(str(ROOT / "setup.py"))  # not "__main__": nothing is set up
    ext = Extension("pkg._C", [str(tmp_path / "kernel.cu")], optional=optional)
    dist = Distribution({"name": "pkg", "ext_modules": [ext], "package_dir": {"pkg": str(tmp_path / "src" / "pkg")},
                         "packages": ["pkg"]})
    command = helpers["recording_archs"](build_ext)(dist)
    command.build_lib, command.build_temp, command.inplace = str(tmp_path / "lib"), str(tmp_path / "temp"), inplace
    command.ensure_finalized()
    command.run()


@pytest.mark.parametrize("optional", [True, False])
def test_a_failed_optional_extension_build_installs_without_it(tmp_path, optional, capsys):
    """An optional extension (QADAPTER_BUILD_CUDA unset) whose build fails is left out with the reason
    (the package builds it just in time later); a required one (QADAPTER_BUILD_CUDA=1) fails the
    build. torch's builder fails with a RuntimeError, which setuptools' own ``optional`` lets through:
    a builder failing as it does stands in for it."""
    from setuptools.command.build_ext import build_ext

    class FailingAsTorchDoes(build_ext):
        def build_extension(self, ext):
            raise RuntimeError("Error compiling objects for extension")

    if optional:
        run_extension_builder(tmp_path, FailingAsTorchDoes, optional)
        assert ("installing without the CUDA extension pkg._C: its build failed (Error compiling objects"
                in capsys.readouterr().out)
        assert not (tmp_path / "lib").exists()  # neither the extension nor its arch record
    else:
        with pytest.raises(RuntimeError, match="Error compiling objects"):
            run_extension_builder(tmp_path, FailingAsTorchDoes, optional)


def test_a_built_extension_has_its_arch_list_beside_it(tmp_path, monkeypatch):
    from setuptools.command.build_ext import build_ext

    class Building(build_ext):
        def build_extension(self, ext):
            Path(self.get_ext_fullpath(ext.name)).parent.mkdir(parents=True, exist_ok=True)
            Path(self.get_ext_fullpath(ext.name)).write_bytes(b"")

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    run_extension_builder(tmp_path, Building, optional=True)
    assert (tmp_path / "lib" / "pkg" / "_C_archs.txt").read_text() == "8.0;9.0\n"
    (tmp_path / "src" / "pkg").mkdir(parents=True)  # an editable install builds in place: beside the sources
    run_extension_builder(tmp_path, Building, optional=True, inplace=True)
    assert (tmp_path / "src" / "pkg" / "_C_archs.txt").read_text() == "8.0;9.0\n"
