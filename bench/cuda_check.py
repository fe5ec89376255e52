"""GPU check of the compiled CUDA extension, in one run (< 8 minutes on an H100, no network).

    python -m bench.cuda_check [--skip-sanitizer] [--out bench/results]     # from the repository root

1. builds (or loads) the extension: ``_cuda.backend_status()`` (just-in-time build if needed);
2. runs the GPU tests, ``pytest -m gpu tests/kernels/test_cuda_ext.py``;
3. reruns a small subset under ``compute-sanitizer --tool memcheck`` when it is installed, with
   torch's caching allocator off so that an out-of-bounds access hits unallocated memory;
4. times the row step at Llama-3.1-8B vocabulary size against the copy bandwidth measured in the
   same run, the eager torch row step and the Triton one (when importable), plus the decode step;
5. writes ``cuda-check-<device>-<date>.json`` and ``.md`` with the device, torch and CUDA versions.

The timer, copy bandwidth and version record are bench/common.py's; the row-step measure is
bench/harness.py's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, Timer, copy_bandwidth, error_text, fresh_path, slug, tool_version, versions
from bench.harness import row_step_bandwidth, row_step_inputs
from qadapter_kernels import _cuda, cuda_backend
from qadapter_kernels.steps import torch_row_step

ROOT = Path(__file__).resolve().parents[1]  # the repository: where the GPU tests run
TIMER = Timer("cuda", warmup=3, repeats=20)

VOCAB = 128256  # Llama-3.1-8B
SANITIZER_TESTS = (
    "test_row_step_matches_torch and 4099 or test_row_step_alias_z or test_pairwise_matches_contract"
    " or test_decode_logprobs_match_combine and 50257 or test_decode_filters_on_large_vocab"
)


def _pytest(args: list[str], *, prefix: list[str] = (), env=None, timeout: int) -> dict:
    cmd = [*prefix, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout} s", -1
    lines = [line for line in out.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if re.search(r"passed|failed|error|TIMEOUT", line)), "")
    return {"command": " ".join(cmd), "returncode": rc, "summary": summary, "seconds": round(time.perf_counter() - start, 1),
            "tail": "\n".join(lines[-40:]) if rc else ""}  # fmt: skip


def _triton_row_step():
    try:
        from qadapter_kernels.triton import triton_row_step
    except Exception as exc:  # noqa: BLE001 - optional: report why it is missing
        return None, f"not importable: {exc}"
    return triton_row_step, ""


def bench_row_step(bandwidth: float) -> list[dict]:
    """Row step at V=128256: in-place P (the training forward) for bf16 and fp32 inputs."""
    triton_step, triton_reason = _triton_row_step()
    rows = 512
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        z, q, targets = row_step_inputs(rows, VOCAB, dtype, "cuda")
        # Unavoidable traffic: read z and q, write p (in place, input dtype).
        ideal_bytes = rows * VOCAB * 3 * z.element_size()
        steps = {"cuda": cuda_backend.cuda_row_step, "torch": torch_row_step}
        if triton_step is not None:
            steps["triton"] = triton_step
        row = {"dtype": str(dtype), "rows": rows, "vocab": VOCAB, "ideal_bytes": ideal_bytes}
        for name, step in steps.items():
            try:
                achieved = row_step_bandwidth(TIMER, step, z, q, targets)
            except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others
                row[name] = {"error": error_text(exc)}
                continue
            ms = ideal_bytes / achieved * 1e3
            row[name] = {"ms": round(ms, 4), "fraction_of_copy_bw": round(achieved / bandwidth, 3)}
        if triton_step is None:
            row["triton"] = {"error": triton_reason}
        results.append(row)
        del z, q
    return results


def bench_decode() -> list[dict]:
    """One decode step, [8, 128256] bf16: log-probs + top-k 50 / top-p 0.9 sampling."""
    from qadapter_kernels import combine_logits

    z = torch.randn(8, VOCAB, device="cuda").bfloat16()
    q = torch.randn(8, VOCAB, device="cuda").bfloat16()

    def torch_decode():
        lp = combine_logits(z, q)
        x = lp / 0.8
        x = x.masked_fill(x < torch.topk(x, 50).values[:, -1:], float("-inf"))
        sorted_x, order = torch.sort(x)
        remove = sorted_x.softmax(-1).cumsum(-1) <= 0.1
        remove[:, -1] = False
        x = x.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        return torch.multinomial(x.softmax(-1), 1)

    out = []
    for name, fn in {
        "cuda logprobs only": lambda: cuda_backend.decode_combine(z, q, sample=False),
        "cuda sample top_k=50 top_p=0.9": lambda: cuda_backend.decode_combine(z, q, temperature=0.8, top_k=50, top_p=0.9),
        "torch sample top_k=50 top_p=0.9": torch_decode,
    }.items():
        out.append({"name": name, "ms": round(TIMER.median_ms(fn), 4)})
    return out


def bench_pairwise() -> dict:
    """Pairwise BT launch for B=8, T=4096 (about 29k scored tokens) vs the torch ops."""
    from qadapter_kernels import LossConfig
    from qadapter_kernels.pairwise import ScoredTokens, pairwise_loss

    tokens = ScoredTokens.from_mask(torch.rand(8, 4095, device="cuda") < 0.9)
    rewards = torch.randn(tokens.rows.shape[0], device="cuda")
    config = LossConfig()
    return {
        "cuda_ms": round(TIMER.median_ms(lambda: cuda_backend.pairwise_loss(rewards, tokens, config)), 4),
        "torch_ms": round(TIMER.median_ms(lambda: pairwise_loss(rewards, tokens, config)), 4),
    }


def _markdown(report: dict) -> str:
    lines = [
        f"# CUDA extension check: {report['device']}",
        "",
        f"{report['date']}; torch {report['torch']}, CUDA {report['cuda']}, nvcc: {report['nvcc']}",
        "",
        f"- extension: {'available' if report['extension']['available'] else 'NOT available: ' + report['extension']['reason']}"
        f" ({report['extension']['seconds']} s to load/build)",
        f"- GPU tests: {report['gpu_tests']['summary']} ({report['gpu_tests']['seconds']} s)",
        f"- compute-sanitizer memcheck: {report['sanitizer'].get('summary') or report['sanitizer'].get('skipped')}",
        f"- copy bandwidth: {report['copy_bandwidth_GBps']} GB/s",
        "",
        "## Row step, V=128256, 512 rows, P in place (fraction = ideal bytes / time / copy bandwidth)",
        "",
        "| dtype | backend | ms | fraction of copy bandwidth |",
        "|---|---|---|---|",
    ]
    for row in report.get("row_step", []):
        for name in ("cuda", "triton", "torch"):
            r = row.get(name, {})
            lines.append(f"| {row['dtype']} | {name} | {r.get('ms', '-')} | {r.get('fraction_of_copy_bw', r.get('error', '-'))} |")
    lines += ["", "## Decode step, [8, 128256] bf16", "", "| what | ms |", "|---|---|"]
    lines += [f"| {d['name']} | {d['ms']} |" for d in report.get("decode", [])]
    if "pairwise" in report:
        p = report["pairwise"]
        lines += ["", f"Pairwise BT, B=8, T=4096: cuda {p['cuda_ms']} ms, torch {p['torch_ms']} ms."]
    for key in ("gpu_tests", "sanitizer"):
        if report[key].get("tail"):
            lines += ["", f"## {key} output (tail)", "", "```", report[key]["tail"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-sanitizer", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2

    info = versions("cuda", packages=())
    report = {"device": info.pop("device"), "date": dt.datetime.now().isoformat(timespec="seconds"),
              "torch": info.pop("torch"), "cuda": info.pop("cuda"), "nvcc": tool_version("nvcc", "--version"),
              "python": info.pop("python"), **info}  # then capability, memory_gib, sms
    start = time.perf_counter()
    available, reason = _cuda.backend_status()
    report["extension"] = {"available": available, "reason": reason, "seconds": round(time.perf_counter() - start, 1)}
    print(f"extension: available={available} {reason} ({report['extension']['seconds']} s)", flush=True)

    report["gpu_tests"] = _pytest(["-m", "gpu", "tests/kernels/test_cuda_ext.py"], timeout=60)
    print(f"gpu tests: {report['gpu_tests']['summary']}", flush=True)

    sanitizer = shutil.which("compute-sanitizer")
    if args.skip_sanitizer or sanitizer is None or not available:
        report["sanitizer"] = {"skipped": "--skip-sanitizer" if args.skip_sanitizer else
                               "compute-sanitizer not found" if sanitizer is None else "no extension"}  # fmt: skip
    else:
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        report["sanitizer"] = _pytest(
            ["-m", "gpu", "-k", SANITIZER_TESTS, "tests/kernels/test_cuda_ext.py"],
            prefix=[sanitizer, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "20"],
            env=env,
            timeout=180,
        )
    print(f"sanitizer: {report['sanitizer'].get('summary') or report['sanitizer'].get('skipped')}", flush=True)

    if available:
        bandwidth = copy_bandwidth(TIMER)
        report["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 1)
        report["row_step"] = bench_row_step(bandwidth)
        report["decode"] = bench_decode()
        report["pairwise"] = bench_pairwise()
    else:
        report["copy_bandwidth_GBps"] = None

    from qadapter.library.atomic import write_texts

    stem = fresh_path(args.out / f"cuda-check-{slug(report['device'])}-{dt.date.today().isoformat()}.json").stem
    markdown = _markdown(report)
    write_texts(args.out, {f"{stem}.json": json.dumps(report, indent=2) + "\n", f"{stem}.md": markdown})
    stem = args.out / stem
    print(markdown)
    print(f"wrote {stem}.json and .md")
    ok = available and report["gpu_tests"]["returncode"] == 0 and report["sanitizer"].get("returncode", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
