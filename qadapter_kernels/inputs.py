"""What the loss and combine entry points accept, with errors that name the argument, and the
precision every backend computes its statistics in."""

from __future__ import annotations

import torch

from .config import LossConfig, check_integer

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every reduction and statistic runs in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_chunk_size(chunk_size: object) -> int | None:
    """``chunk_size`` as a positive int (numpy's and torch's integers too), or None (automatic): 0,
    negatives, floats and bools are refused."""
    return None if chunk_size is None else check_integer("chunk_size", chunk_size, least=1, note=" or None (automatic)")


def check_totals(total_pairs: object, total_tokens: object, config, pairs: int, tokens: int) -> tuple[int, int]:
    """The whole batch's pair and scored-token counts a batch's loss is a share of.

    Both; whole numbers (numpy's and torch's integers too), at least this batch's own counts; and
    only where the loss is a sum over pairs and tokens: with ``reward_norm="padded"`` a pair's reward
    depends on how far its batch is padded, so no share of a larger batch's loss exists.
    """
    if total_pairs is None or total_tokens is None:
        raise ValueError("total_pairs and total_tokens go together: give both or neither")
    if config.reward_norm == "padded":
        raise ValueError('total_pairs/total_tokens need reward_norm="mean" or "sum": with "padded" a pair\'s '
                         "reward depends on its batch's padding, so the loss of a larger batch has no exact share")
    own = " (this batch's own count)"
    return (check_integer("total_pairs", total_pairs, least=max(pairs, 1), note=own),
            check_integer("total_tokens", total_tokens, least=max(tokens, 1), note=own))


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    return t


def check_head(
    weight: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    *,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Checks the frozen head and the optional Q head against the hidden states."""
    check_float_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ValueError(f"weight must be [V, d] with d={hidden_size} (the hidden size); got {describe(weight)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    vocab = weight.shape[0]
    named = [("weight", weight)]
    if q_weight is not None:
        check_float_tensor("q_weight", q_weight)
        if tuple(q_weight.shape) != (vocab, hidden_size):
            raise ValueError(f"q_weight must be [V, d] = [{vocab}, {hidden_size}] like weight; got {describe(q_weight)}")
        named.append(("q_weight", q_weight))
    if q_bias is not None:
        check_float_tensor("q_bias", q_bias)
        if tuple(q_bias.shape) != (vocab,):
            raise ValueError(f"q_bias must be [V] = [{vocab}]; got {describe(q_bias)}")
        named.append(("q_bias", q_bias))
    for name, t in named:
        if t.dtype != dtype:
            raise TypeError(f"{name} must have the hidden states' dtype {dtype}; got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on the hidden states' device {device}; got {t.device}")


def check_unbatched(entry: str, *tensors: torch.Tensor | None) -> None:
    """``entry`` writes its chunks into one preallocated output, which torch.vmap cannot batch: refused
    by name (not by vmap's error about an in-place write) with what does the same."""
    if any(t is not None and torch._C._functorch.is_batchedtensor(t) for t in tensors):
        raise RuntimeError(f"{entry} writes its chunks into one output, which torch.vmap cannot batch; it takes "
                           "hidden states of any leading shape: pass the batch as a leading dimension instead")


def check_hidden_pair(base_hidden, q_hidden, weight, q_weight, q_bias) -> None:
    """Hidden states ``[..., d]`` of the frozen model and of the adapter, alike in shape, dtype and
    device, and the heads that go with them."""
    check_float_tensor("base_hidden", base_hidden)
    check_float_tensor("q_hidden", q_hidden)
    if base_hidden.shape != q_hidden.shape or q_hidden.dim() < 1:
        raise ValueError(
            f"base_hidden must have q_hidden's shape {tuple(q_hidden.shape)} ([..., d]); got {tuple(base_hidden.shape)}"
        )
    if base_hidden.dtype != q_hidden.dtype or base_hidden.device != q_hidden.device:
        raise TypeError(
            f"base_hidden must match q_hidden's dtype {q_hidden.dtype} and device {q_hidden.device}; "
            f"got {base_hidden.dtype} on {base_hidden.device}"
        )
    check_head(weight, q_weight, q_bias, hidden_size=q_hidden.shape[-1], dtype=q_hidden.dtype, device=q_hidden.device)


def check_loss_inputs(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    config: LossConfig,
    *,
    paired: bool = True,
    vocab: int | None = None,
) -> None:
    """Raises a clear error, naming the argument, for every malformed input. ``paired``: the rows are
    chosen/rejected pairs (the loss); the token statistics alone take any number of rows. ``vocab``:
    the whole vocabulary where ``weight`` holds a rank's rows of it (default: ``weight``'s rows)."""
    check_float_tensor("base_hidden", base_hidden)
    check_float_tensor("q_hidden", q_hidden)
    if q_hidden.dim() != 3:
        raise ValueError(f"q_hidden must be [B, T, d]; got {describe(q_hidden)}")
    if base_hidden.shape != q_hidden.shape:
        raise ValueError(
            f"base_hidden must have q_hidden's shape {tuple(q_hidden.shape)}; got {tuple(base_hidden.shape)}"
        )
    batch, seq, hidden = q_hidden.shape
    if batch == 0 or (paired and batch % 2):
        raise ValueError(
            f"the batch size B (dim 0 of q_hidden) must be even and > 0: rows 0..B/2-1 are the chosen "
            f"responses, rows B/2.. the rejected ones; got B={batch}"
        )
    if seq < 2:
        raise ValueError(f"the sequence length T (dim 1 of q_hidden) must be >= 2; got T={seq}")
    if base_hidden.dtype != q_hidden.dtype:
        raise TypeError(f"base_hidden must have q_hidden's dtype {q_hidden.dtype}; got {base_hidden.dtype}")
    if base_hidden.device != q_hidden.device:
        raise ValueError(f"base_hidden must be on q_hidden's device {q_hidden.device}; got {base_hidden.device}")
    check_head(weight, q_weight, q_bias, hidden_size=hidden, dtype=q_hidden.dtype, device=q_hidden.device)

    check_targets("labels", labels, (batch, seq), vocab=vocab or weight.shape[0], ignore_index=config.ignore_index,
                  device=q_hidden.device, shift=1)
    if not any_set(labels[:, 1:] != config.ignore_index):
        raise ValueError(
            "labels score no token at all: every labels[:, 1:] equals ignore_index, so the loss is undefined"
        )


def any_set(mask: torch.Tensor) -> bool:
    """Whether any entry of ``mask`` is set. A data-dependent answer: under torch.compile it is
    taken eagerly behind a graph break, where a traced ``bool(mask.any())`` would warn of the break.
    The break is asked for only while compiling: ``torch.compiler.disable`` imports dynamo, most of a
    second of every import of the package."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_eager_any)(mask)
    return _eager_any(mask)


def _eager_any(mask: torch.Tensor) -> bool:
    return bool(mask.any())


def check_targets(name: str, targets: object, shape: tuple, *, vocab: int, ignore_index: int, device: torch.device,
                  shift: int = 0) -> torch.Tensor:
    """Integer token ids of ``shape`` on ``device``; every one from index ``shift`` on (along the last
    dimension) in ``[0, vocab)`` or ``ignore_index``."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (token ids); got {targets.dtype}")
    if tuple(targets.shape) != tuple(shape):
        dims = "[B, T]" if shift else "the hidden states' leading dimensions"
        raise ValueError(f"{name} must be {dims} = {list(shape)}; got shape {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"{name} must be on the hidden states' device {device}; got {targets.device}")
    scored_ids = targets[..., shift:]
    bad = (scored_ids != ignore_index) & ((scored_ids < 0) | (scored_ids >= vocab))
    if any_set(bad):
        raise ValueError(
            f"{name} must lie in [0, {vocab}) (the vocabulary size V) or equal ignore_index={ignore_index}; "
            f"found {int(scored_ids[bad][0])}"
        )
    return targets
