"""First-order backwards that refuse a second derivative with a clear error instead of a wrong one.

The fused backwards compute their gradients from saved statistics (the chunked backends' ``E_p[Wq]``,
the vocabulary-parallel merges' weights) that are constants to autograd: differentiating their
gradients again would silently drop those terms. ``torch.autograd.function.once_differentiable``
refuses too, but through detached stand-ins, so a gradient of the gradient with respect to the
inputs reads "not used in the graph" (or zeros with ``allow_unused``) rather than the refusal.
"""

from __future__ import annotations

import functools

import torch

from .autocast import outside_autocast


class _SecondDerivativeRefused(torch.autograd.Function):
    """The first derivative ``grad`` as it is, on the graph of ``anchors`` (the tensors it depends on),
    so that differentiating it again reaches this node, which raises."""

    @staticmethod
    def forward(ctx, name, grad, *anchors):
        ctx.name = name
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"{ctx.name}'s backward is first-order: a second derivative (create_graph=True, then a gradient of "
            "the gradient) through it is not supported; backend='reference' computes one"
        )


def first_order(backward):
    """Decorates an autograd Function's ``backward(ctx, *grads)``: under ``create_graph=True`` the
    gradients it returns carry :class:`_SecondDerivativeRefused`, anchored on the incoming gradients
    and the saved tensors that are on the graph."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            out = backward(ctx, *grads)
        out = out if isinstance(out, tuple) else (out,)
        anchors = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not anchors:
            return out
        name = backward.__qualname__.rsplit(".", 1)[0].lstrip("_")
        return tuple(_SecondDerivativeRefused.apply(name, g, *anchors) if isinstance(g, torch.Tensor) else g
                     for g in out)

    return wrapped


def fused_backward(backward):
    """Decorates a fused backward: first-order (:func:`first_order`), and computing in its inputs'
    dtypes whatever autocast region the backward pass runs in (:func:`~.autocast.outside_autocast`)."""
    return first_order(outside_autocast(backward))
