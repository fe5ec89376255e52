"""Compile every kernel for real GPU architectures on a machine without a GPU.

Triton's interpreter runs the kernels' *logic* on CPU, but it is far more permissive than the
compiler (loop-carried types, layouts, shared memory). This check runs the whole NVIDIA pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas shipped in the triton wheel) for each
kernel variant (the row step plain and soft-capped, with and without the block statistics of
gradient filtering; the decode combine; the kept-blocks products of gradient filtering), and compares the shared
memory each one needs with the per-block limit of the architecture, and reports registers and
spills. No driver or device is touched.

Pointers and row strides are declared 16-divisible, as Triton's launcher specializes them for
ordinary contiguous tensors, so the code compiled is the one a real launch runs.

Usage (TRITON_INTERPRET must be unset, so the kernels are built as compilable JIT functions)::

    python -m qadapter_kernels.toolchain.aot_check [--arch 80 86 89 90 100 120] [--mode full|quick|smoke]

``full``: every input dtype; ``quick`` and ``smoke``: bfloat16.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import NamedTuple

# Max dynamic shared memory per block (opt-in), bytes, per compute capability (CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability"): 163 KB on sm_80, 99 KB on sm_86 / sm_89
# and on consumer Blackwell sm_120 (128 KB per SM there), 227 KB on sm_90 and datacenter Blackwell sm_100.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DEFAULT_ARCHS = (80, 86, 89, 90, 100, 120)

_FLOAT_ARGS = {"alpha_tilde", "alpha_0", "softcap"}
_INPUT_PTRS = {"z_ptr", "q_ptr", "p_ptr", "w_ptr", "h_ptr"}
_INDEX_PTRS = {"targets_ptr": "*i64", "tokens_ptr": "*i32", "counts_ptr": "*i32", "tile_block_ptr": "*i32",
               "tile_first_ptr": "*i32"}
_TL_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


class Variant(NamedTuple):
    """One compilation: ``divisible`` names the integer arguments that real launches pass as
    multiples of 16 (the launcher then specializes them, as it does pointers and row strides)."""

    name: str
    fn: object
    dtype: str
    constexprs: dict
    warps: int
    stages: int
    divisible: tuple[str, ...] = ()


def _signature(variant: Variant) -> tuple[dict, dict]:
    """Argument types and the 16-divisibility attributes Triton's launcher would give them."""
    jit_fn, dtype, constexprs = variant.fn, variant.dtype, variant.constexprs
    sig, attrs = {}, {}
    for index, name in enumerate(jit_fn.arg_names):
        if name.endswith("_ptr") or name.startswith("stride") or name in variant.divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INDEX_PTRS:
            sig[name] = _INDEX_PTRS[name]
        elif name in _INPUT_PTRS:
            sig[name] = "*" + _TL_DTYPE[dtype]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, attrs


def _variants(mode: str):
    """The :class:`Variant` s to compile."""
    import torch

    from ..steps import FILTER_BLOCK
    from ..triton import decode, kept_product, row_step

    dtypes = ("bfloat16", "float16", "float32") if mode == "full" else ("bfloat16",)
    for dtype in dtypes:
        # The soft cap (Gemma-2) is capped as the step reads; block statistics for gradient filtering.
        for cap, stats in itertools.product((False, True), (False, True)):
            constexprs = {"BLOCK_V": FILTER_BLOCK if stats else 4096, "SOFTCAP": cap, "STATS": stats,
                          "FILTER": FILTER_BLOCK}
            yield Variant("row_step", row_step._row_step_kernel, dtype, constexprs, row_step.NUM_WARPS, 3)
        yield Variant("combine", decode._combine_kernel, dtype, {"BLOCK_V": 4096}, decode.NUM_WARPS, 3)
        # Real vocabularies and hidden sizes are multiples of 16 (Llama-3's 128,256 x 4,096), which
        # lets the loads vectorize and the pipeline buffer: compiled both ways.
        block_m, block_d, block_k = kept_product.tile_sizes(getattr(torch, dtype))
        for divisible in ((), ("V", "D")):
            yield Variant("kept_product", kept_product._kept_blocks_product_kernel, dtype,
                          {"FILTER": FILTER_BLOCK, "BLOCK_M": block_m, "BLOCK_D": block_d, "BLOCK_K": block_k,
                           "PRECISION": "ieee"},
                          kept_product.NUM_WARPS, kept_product.NUM_STAGES, divisible)
            head_n, head_d, head_k = kept_product.head_tile_sizes()
            yield Variant("kept_head", kept_product._kept_blocks_head_kernel, dtype,
                          {"FILTER": FILTER_BLOCK, "BLOCK_N": head_n, "BLOCK_D": head_d, "BLOCK_K": head_k,
                           "PRECISION": "ieee" if dtype == "float32" else "tf32"},
                          kept_product.NUM_WARPS, kept_product.NUM_STAGES, divisible)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """``(registers per thread, local-memory bytes per thread)`` of a cubin, read with the
    ``cuobjdump`` shipped in the triton wheel; local memory is where spilled registers go."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return int(regs.group(1)) if regs else -1, int(local.group(1)) if local else -1


def check(archs=DEFAULT_ARCHS, mode: str = "full") -> list[dict]:
    """Compiles every variant for every arch; returns one record per compilation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..triton._common import INTERPRET

    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter builds no compilable kernels")
    records = []
    for variant in _variants(mode):
        signature, attrs = _signature(variant)
        src = ASTSource(fn=variant.fn, signature=signature, constexprs=variant.constexprs, attrs=attrs)
        for arch in archs:
            compiled = triton.compile(
                src, target=GPUTarget("cuda", arch, 32),
                options={"num_warps": variant.warps, "num_stages": variant.stages},
            )
            shared = int(compiled.metadata.shared)
            regs, local = _resource_usage(compiled.asm["cubin"])
            records.append(dict(
                kernel=variant.name, arch=arch, dtype=variant.dtype, warps=variant.warps, stages=variant.stages,
                shared=shared, regs=regs, spill_bytes=local, fits=shared <= SMEM_LIMIT[arch],
                config=dict(variant.constexprs, **{name: "16k" for name in variant.divisible}),
            ))
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), choices=sorted(SMEM_LIMIT))
    parser.add_argument("--mode", choices=("full", "quick", "smoke"), default="full")
    args = parser.parse_args(argv)
    records = check(tuple(args.arch), args.mode)
    for r in records:
        print(f"{r['kernel']:16s} sm_{r['arch']} {r['dtype']:9s} {r['config']} warps={r['warps']} "
              f"stages={r['stages']} smem={r['shared']} regs={r['regs']} spill={r['spill_bytes']} "
              f"{'ok' if r['fits'] else 'OVER LIMIT'}")
    over = [r for r in records if not r["fits"]]
    for r in over:
        print("over the shared-memory limit:", r["kernel"], f"sm_{r['arch']}", r["dtype"], r["config"])
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
