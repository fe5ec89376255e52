"""The CUDA backend: finds (or builds) the compiled extension ``qadapter_kernels._C`` and wraps it.

The extension comes from ``pip install --no-build-isolation .`` on a machine with a CUDA build of
torch and nvcc (see setup.py); failing that, it is built just in time, on first use, from the
CUDA sources shipped inside the package (``qadapter_kernels/csrc``; ``csrc/`` in a source
checkout) with nvcc and ninja, into torch's extensions cache (``TORCH_EXTENSIONS_DIR``, else the
user's cache directory; never into site-packages). ``python -m qadapter_kernels.build_cuda`` does
that build on purpose and shows the compiler's output. Importing this module never fails: without
a GPU, nvcc, ninja or a successful build, :func:`backend_status` says which, and what to run.

What it offers on top of the kernels (csrc/qadapter_kernels.h):

- ``token_stats``: the chunked pipeline (``chunked.chunked_token_stats``) with the fused
  :func:`cuda_row_step`; the contract of ``backends``.
- :func:`pairwise_loss`: drop-in for ``pairwise.pairwise_loss``, forward and gradient in one launch.
- :func:`decode_combine`: combined-policy log-probs for a decode step, with temperature, top-k,
  top-p filtering and seeded sampling.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

from . import cuda_archs, pairwise
from .registry import Backend
from .chunked import chunked_token_stats, torch_row_step
from .config import REWARD_NORM, LossConfig, check_real
from .pairwise import QAdapterLossOutput, ScoredTokens

BUILD_COMMAND = "python -m qadapter_kernels.build_cuda"
ARCHS_FILE = "_C_archs.txt"  # beside the compiled extension: the TORCH_CUDA_ARCH_LIST it was built for


def sources_dir() -> Path | None:
    """The CUDA sources: inside the installed package, else the checkout's csrc/; None if neither."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "binding.cpp").is_file():
            return candidate
    return None
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PAIRWISE_MAX_BATCH = 2048  # QAK_PAIRWISE_MAX_BATCH in csrc/qadapter_kernels.h
_NORM_CODES = {name: code for code, name in enumerate(REWARD_NORM)}  # enum qak_reward_norm


def error_summary(message: str, limit: int = 1500) -> str:
    """The compiler's error lines (or the message's last lines) of a failed build, shortened."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join(errors[:6] or lines[-6:])[:limit]


def jit_arch_list(capability: tuple[int, int] | None) -> str:
    """The architectures of a just-in-time build: ``TORCH_CUDA_ARCH_LIST`` when set, else the
    device's own capability with PTX (for an nvcc too old for it, PTX of an older one); without a
    device, every supported one (``cuda_archs.arch_list``)."""
    from torch.utils.cpp_extension import CUDA_HOME

    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if chosen:
        return chosen
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    cuda = cuda_archs.nvcc_version(nvcc if nvcc and os.path.isfile(nvcc) else None)
    return cuda_archs.device_arch_list(capability, cuda) if capability else cuda_archs.arch_list(cuda)


def jit_build(prebuilt_error: str = "", *, verbose: bool = False):
    """``(module, "")`` built (or found in the cache) from the shipped sources for this device, or
    ``(None, why not)``. The architectures go to nvcc as explicit flags, which torch's build cache
    keys on: a cached build for other architectures is not taken for this one."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return None, f"nvcc not found (install the CUDA toolkit matching torch {torch.version.cuda}, or set CUDA_HOME)"
    if shutil.which("ninja") is None:
        return None, "ninja not found: pip install ninja, then " + BUILD_COMMAND
    csrc = sources_dir()
    if csrc is None:
        return None, f"the prebuilt extension does not import ({prebuilt_error}) and no CUDA sources are installed"
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    archs = jit_arch_list(capability)
    fits, why = cuda_archs.covers(archs, capability) if capability else (True, "")
    if not fits:
        return None, f"TORCH_CUDA_ARCH_LIST does not cover this GPU: {why}; unset it or add {capability[0]}.{capability[1]}"
    try:
        module = load(
            name="qadapter_kernels_C",
            sources=[str(p) for p in sorted(csrc.glob("*.cu"))] + [str(csrc / "binding.cpp")],
            extra_include_paths=[str(csrc)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", *cuda_archs.gencode_flags(archs)],
            verbose=verbose or os.environ.get("QADAPTER_JIT_VERBOSE") == "1",
        )
    except Exception as exc:  # noqa: BLE001 - any build failure disables the backend, with its reason
        return None, f"building the CUDA extension failed ({BUILD_COMMAND} shows why): {error_summary(str(exc))}"
    module.built_archs = archs
    return module, ""


def built_archs(module) -> str | None:
    """The arch list ``module`` was built for: recorded by the just-in-time build, or by setup.py
    beside the compiled extension (``_C_archs.txt``); None when unknown."""
    recorded = getattr(module, "built_archs", None)
    if recorded:
        return recorded
    where = getattr(module, "__file__", None)
    sidecar = Path(where).with_name(ARCHS_FILE) if where else None
    return (sidecar.read_text().strip() or None) if sidecar is not None and sidecar.is_file() else None


def image_status(module) -> tuple[bool, str]:
    """Whether ``module``'s kernels have an image (a cubin or PTX) the current GPU runs, and if not why.

    The recorded arch list is compared with the device's capability; then the CUDA runtime is
    asked for the row step kernel's attributes, which fails with "no kernel image is available"
    exactly when the launches would.
    """
    capability = torch.cuda.get_device_capability()
    name = f"{torch.cuda.get_device_name()} (compute capability {capability[0]}.{capability[1]})"
    archs = built_archs(module)
    if archs is not None:
        fits, why = cuda_archs.covers(archs, capability)
        if not fits:
            return False, f"the CUDA extension cannot run on this {name}: {why}"
    probe = getattr(module, "kernel_image", None)
    if probe is not None:
        try:
            probe()
        except RuntimeError as exc:
            return False, f"the CUDA extension has no kernel image for this {name}: {exc}"
    return True, ""


@functools.lru_cache(maxsize=None)
def _load():
    """``(extension module, "")`` or ``(None, why not)``; built at most once per process. A prebuilt
    extension without an image for this GPU gives way to a just-in-time build for it."""
    if torch.version.cuda is None:
        return None, "torch is a CPU build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU (torch.cuda.is_available() is False)"
    try:
        from . import _C
    except ImportError as exc:
        module, reason = jit_build(str(exc))
    else:
        fits, why = image_status(_C)
        if fits:
            return _C, ""
        module, reason = jit_build(why)
        if module is None:
            return None, f"{why}; a just-in-time build for it did not succeed either: {reason}"
    if module is None:
        return None, reason
    fits, why = image_status(module)
    return (module, "") if fits else (None, why)


def backend_status() -> tuple[bool, str]:
    ext, reason = _load()
    return ext is not None, reason


def extension():
    """The loaded extension module; raises with the reason when it is unavailable."""
    ext, reason = _load()
    if ext is None:
        raise RuntimeError(f"the qadapter_kernels CUDA extension is not available: {reason}")
    return ext


def cuda_row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype):
    """The fused row step (``chunked.RowStep`` contract); p overwrites q when p_dtype is q's dtype.

    float64 inputs keep float64 statistics through the eager step: the kernels compute in float32.
    """
    if q.dtype not in KERNEL_DTYPES:
        return torch_row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype)
    from . import _cuda_ops

    z, q, targets = z.contiguous(), q.contiguous(), targets.contiguous()
    if p_dtype == q.dtype:
        q_taken, value = _cuda_ops.row_step_(z, q, targets, float(alpha_tilde), float(alpha_0))
        return q_taken, value, q
    q_taken, value, p = _cuda_ops.row_step(z, q, targets, float(alpha_tilde), float(alpha_0))
    return q_taken, value, p.to(p_dtype)


cuda_token_stats = functools.partial(chunked_token_stats, row_step=cuda_row_step)


class _PairwiseBT(torch.autograd.Function):
    """stats = [loss, bt, chi2, accuracy, margin] from packed rewards; only stats[0] has a gradient."""

    @staticmethod
    def forward(ctx, packed, counts, padded_len, beta, norm_code):
        from . import _cuda_ops

        seq_rewards, stats, grad = _cuda_ops.pairwise_bt(packed, counts, padded_len, beta, norm_code)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(seq_rewards)
        return stats, seq_rewards

    @staticmethod
    def backward(ctx, grad_stats, _grad_seq):
        (grad,) = ctx.saved_tensors
        return grad_stats[0] * grad, None, None, None, None


def pairwise_loss(rewards: torch.Tensor, tokens: ScoredTokens, config: LossConfig) -> QAdapterLossOutput:
    """``pairwise.pairwise_loss`` with the pairing, BT, chi2 and dL/dr_t in one kernel launch.

    The kernel takes packed CUDA float32 rewards of at least one token and B <= 2048 rows;
    anything else (float64 rewards, CPU tensors) goes to the shared torch implementation.
    """
    kernel_ok = rewards.is_cuda and rewards.dtype == torch.float32 and tokens.batch <= _PAIRWISE_MAX_BATCH
    if not kernel_ok or rewards.numel() == 0:
        return pairwise.pairwise_loss(rewards, tokens, config)
    stats, seq_rewards = _PairwiseBT.apply(
        rewards, tokens.counts, tokens.padded_len, config.beta, _NORM_CODES[config.reward_norm]
    )
    half = tokens.batch // 2
    detached = stats.detach()
    return QAdapterLossOutput(
        loss=stats[0],
        bt_loss=detached[1],
        chi2_loss=detached[2],
        chosen_rewards=seq_rewards[:half],
        rejected_rewards=seq_rewards[half:],
        accuracy=detached[3],
        margin=detached[4],
    )


def decode_combine(
    base_logits: torch.Tensor,
    q_values: torch.Tensor,
    *,
    alpha_tilde: float = LossConfig.alpha_tilde,
    alpha_0: float = LossConfig.alpha_0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Combined-policy log-probs ``[..., V]`` (float32) and, if ``sample``, one token id per row.

    The log-probs are ``combine.combine_logits`` (unfiltered). Sampling draws from
    ``softmax(logprobs / temperature)`` restricted to the ``top_k`` most likely tokens (0: all),
    then to the smallest most-likely set of mass >= ``top_p``, as Hugging Face's warpers do;
    ``top_k=1`` is greedy. The same ``seed`` gives the same ids. Inputs: CUDA float32, float16
    or bfloat16 of one shape.
    """
    alpha_tilde = check_real("alpha_tilde", alpha_tilde, positive=True)
    alpha_0 = check_real("alpha_0", alpha_0, non_negative=True)
    temperature = check_real("temperature", temperature, positive=True)
    top_p = check_real("top_p", top_p, positive=True)
    if top_p > 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k filter); got {top_k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63); got {seed!r}")
    if base_logits.shape != q_values.shape or base_logits.dim() < 1:
        raise ValueError(
            f"q_values must have base_logits' shape {tuple(base_logits.shape)} ([..., V]); got {tuple(q_values.shape)}"
        )
    if base_logits.dtype not in KERNEL_DTYPES or q_values.dtype != base_logits.dtype:
        raise TypeError(
            f"base_logits and q_values must share one of float32, float16, bfloat16; got {base_logits.dtype} "
            f"and {q_values.dtype} (float64: use combine_logits)"
        )
    lead, vocab = base_logits.shape[:-1], base_logits.shape[-1]
    z = base_logits.reshape(-1, vocab).contiguous()
    q = q_values.reshape(-1, vocab).contiguous()
    from . import _cuda_ops

    extension()  # the reason, when the extension cannot run here, before any dispatch
    logprobs, sampled = _cuda_ops.decode_combine(z, q, alpha_tilde, alpha_0, temperature, top_k, top_p, seed, sample)
    return logprobs.reshape(*lead, vocab), sampled.reshape(lead) if sample else None


def combine_logits(base_logits: torch.Tensor, q_values: torch.Tensor, *, alpha_tilde: float = LossConfig.alpha_tilde,
                   alpha_0: float = LossConfig.alpha_0) -> torch.Tensor:
    """The backend's decode combine (``combine.combine_logits``' contract): :func:`decode_combine`'s
    log-probs, one kernel per step (float64 stays eager); the sampling is the caller's."""
    if base_logits.dtype not in KERNEL_DTYPES:
        from .combine import combine_logits as eager

        return eager(base_logits, q_values, alpha_tilde=alpha_tilde, alpha_0=alpha_0)
    return decode_combine(base_logits, q_values, alpha_tilde=alpha_tilde, alpha_0=alpha_0, sample=False)[0]


BACKEND = Backend(
    name="cuda",
    summary="chunked pipeline with the compiled CUDA row step and pairwise BT kernel",
    token_stats=cuda_token_stats,
    availability=backend_status,
    pairwise=pairwise_loss,
    combine=combine_logits,
)
