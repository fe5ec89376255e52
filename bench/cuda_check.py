"""GPU check of the compiled CUDA extension, in one run (< 8 minutes on an H100, no network).

    python bench/cuda_check.py [--skip-sanitizer] [--out bench/results]

1. builds (or loads) the extension: ``_cuda.backend_status()`` (just-in-time build if needed);
2. runs the GPU tests, ``pytest -m gpu tests/test_cuda_ext.py``;
3. reruns a small subset under ``compute-sanitizer --tool memcheck`` when it is installed, with
   torch's caching allocator off so that an out-of-bounds access hits unallocated memory;
4. times the row step at Llama-3.1-8B vocabulary size against the copy bandwidth measured in the
   same run, the eager torch row step and the Triton one (when importable), plus the decode step;
5. writes ``cuda-check-<device>-<date>.json`` and ``.md`` with the device, torch and CUDA versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qadapter_kernels import _cuda  # noqa: E402
from qadapter_kernels.chunked import torch_row_step  # noqa: E402

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


def _time_ms(fn, *, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of fn() over CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


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
        esize = torch.finfo(dtype).bits // 8
        z = torch.randn(rows, VOCAB, device="cuda").to(dtype)
        q = torch.randn(rows, VOCAB, device="cuda").to(dtype)
        targets = torch.randint(0, VOCAB, (rows,), device="cuda")
        # Unavoidable traffic: read z and q, write p (in place, input dtype).
        ideal_bytes = rows * VOCAB * 3 * esize
        steps = {
            "cuda": lambda: _cuda.cuda_row_step(z, q, targets, 1.0, 0.01, dtype),
            "torch": lambda: torch_row_step(z, q, targets, 1.0, 0.01, dtype),
        }
        if triton_step is not None:
            steps["triton"] = lambda: triton_step(z, q, targets, 1.0, 0.01, dtype)
        row = {"dtype": str(dtype), "rows": rows, "vocab": VOCAB, "ideal_bytes": ideal_bytes}
        for name, fn in steps.items():
            try:
                ms = _time_ms(fn)
            except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            row[name] = {"ms": round(ms, 4), "fraction_of_copy_bw": round(ideal_bytes / (ms * 1e-3) / bandwidth, 3)}
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
        "cuda logprobs only": lambda: _cuda.decode_combine(z, q, sample=False),
        "cuda sample top_k=50 top_p=0.9": lambda: _cuda.decode_combine(z, q, temperature=0.8, top_k=50, top_p=0.9),
        "torch sample top_k=50 top_p=0.9": torch_decode,
    }.items():
        out.append({"name": name, "ms": round(_time_ms(fn), 4)})
    return out


def bench_pairwise() -> dict:
    """Pairwise BT launch for B=8, T=4096 (about 29k scored tokens) vs the torch ops."""
    from qadapter_kernels import LossConfig
    from qadapter_kernels.pairwise import ScoredTokens, pairwise_loss

    tokens = ScoredTokens.from_mask(torch.rand(8, 4095, device="cuda") < 0.9)
    rewards = torch.randn(tokens.rows.shape[0], device="cuda")
    config = LossConfig()
    return {
        "cuda_ms": round(_time_ms(lambda: _cuda.pairwise_loss(rewards, tokens, config)), 4),
        "torch_ms": round(_time_ms(lambda: pairwise_loss(rewards, tokens, config)), 4),
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
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--skip-sanitizer", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2

    nvcc = shutil.which("nvcc")
    report = {
        "device": torch.cuda.get_device_name(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvcc": subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        if nvcc else "not found",
        "python": platform.python_version(),
    }  # fmt: skip
    start = time.perf_counter()
    available, reason = _cuda.backend_status()
    report["extension"] = {"available": available, "reason": reason, "seconds": round(time.perf_counter() - start, 1)}
    print(f"extension: available={available} {reason} ({report['extension']['seconds']} s)", flush=True)

    report["gpu_tests"] = _pytest(["-m", "gpu", "tests/test_cuda_ext.py"], timeout=45)
    print(f"gpu tests: {report['gpu_tests']['summary']}", flush=True)

    sanitizer = shutil.which("compute-sanitizer")
    if args.skip_sanitizer or sanitizer is None or not available:
        report["sanitizer"] = {"skipped": "--skip-sanitizer" if args.skip_sanitizer else
                               "compute-sanitizer not found" if sanitizer is None else "no extension"}  # fmt: skip
    else:
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        report["sanitizer"] = _pytest(
            ["-m", "gpu", "-k", SANITIZER_TESTS, "tests/test_cuda_ext.py"],
            prefix=[sanitizer, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "20"],
            env=env,
            timeout=180,
        )
    print(f"sanitizer: {report['sanitizer'].get('summary') or report['sanitizer'].get('skipped')}", flush=True)

    if available:
        bandwidth = _copy_bandwidth()
        report["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 1)
        report["row_step"] = bench_row_step(bandwidth)
        report["decode"] = bench_decode()
        report["pairwise"] = bench_pairwise()
    else:
        report["copy_bandwidth_GBps"] = None

    args.out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", report["device"]).strip("-")
    stem = args.out / f"cuda-check-{device}-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = _markdown(report)
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {stem}.json and .md")
    ok = available and report["gpu_tests"]["returncode"] == 0 and report["sanitizer"].get("returncode", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
