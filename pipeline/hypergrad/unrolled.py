"""The independent reference: plain autograd through the whole stored training graph.

Memory grows with T (every step's graph is kept), so this is for small T only. It shares
nothing with the reverse recursion: the L2 term goes through autograd, not a closed form.
"""
from __future__ import annotations

import torch

from pipeline.hyper import HyperSpace
from pipeline.hypergrad.problem import Problem


def l2_penalty(problem: Problem, w: torch.Tensor, l2: HyperSpace | None) -> torch.Tensor:
    """R(w) = sum 10^lambda * w^2 over the parameters that carry an L2 hyperparameter."""
    if l2 is None:
        return w.new_zeros(())
    named = problem.unflatten(w)
    return sum((l2.value(n).to(w.dtype) * named[n].pow(2)).sum() for n in l2.shapes)


def train(problem: Problem, l2: HyperSpace | None, alpha: torch.Tensor, beta: torch.Tensor,
          w0: torch.Tensor, create_graph: bool, buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """w_T of classical-momentum SGD; differentiable in every input when `create_graph`."""
    w, v = w0, problem.v0
    for t in range(problem.steps):
        loss = problem.train_loss(w, t, buffers=buffers) + l2_penalty(problem, w, l2)
        g = torch.autograd.grad(loss, w, create_graph=create_graph)[0]
        v = beta[t] * v - (1 - beta[t]) * g
        w = w + alpha[t] * v
        if not create_graph:
            w = w.detach().requires_grad_()
    return w


def hypergradient(problem: Problem, l2: HyperSpace | None) -> dict:
    dtype = problem.dtype
    l2 = l2.clone() if l2 is not None else None
    leaves = list(l2.values.values()) if l2 is not None else []
    alpha = problem.alpha.to(dtype).clone().requires_grad_()
    beta = problem.beta.to(dtype).clone().requires_grad_()
    w0 = problem.w0.clone().requires_grad_()
    scales = problem.scales.clone() if problem.scales is not None else None
    scale_leaves = list(scales.values.values()) if scales is not None else []
    for leaf in leaves + scale_leaves:
        leaf.requires_grad_()
    buffers = {n: scales.log_value(n).to(dtype) for n in scales.shapes} if scales is not None else None
    f = problem.val_loss(train(problem, l2, alpha, beta, w0, create_graph=True, buffers=buffers), buffers)
    grads = torch.autograd.grad(f, [alpha, beta, w0, *leaves, *scale_leaves], materialize_grads=True)
    out = {"alpha": grads[0], "beta": grads[1], "w0": grads[2], "val_loss": f.item()}
    if l2 is not None:
        out["log10_l2"] = dict(zip(l2.values, grads[3:3 + len(leaves)]))
    if scales is not None:
        out["scale"] = dict(zip(scales.values, grads[3 + len(leaves):]))
    return out


def validation_loss(problem: Problem, l2: HyperSpace | None) -> float:
    """f(w_T) after plain float training: the function finite differences probe."""
    w0 = problem.w0.clone().requires_grad_()
    w = train(problem, l2, problem.alpha.to(problem.dtype), problem.beta.to(problem.dtype), w0,
              create_graph=False)
    with torch.no_grad():
        return problem.val_loss(w.detach()).item()
