"""The greedy one-step hypergradient (Luketina et al. 2016, T1-T2; Baydin et al. 2018,
hypergradient descent; algorithms §6b): the hyperparameters' effect through the last step only.

    w_T(theta) = w_{T-1} + alpha_{T-1} (beta v_{T-2} - (1 - beta) (g(w_{T-1}, theta) + c(lambda) w_{T-1}))
    d theta    = d f(w_T(theta), theta) / d theta,   w_{T-1} and v_{T-2} held fixed

taken by autograd through that one step (a gradient kept for a second backward), not by the
reverse recursion: `truncated` with K = 1 computes the same number the other way.
"""
from __future__ import annotations

import torch

from pipeline import data_parallel
from pipeline.hyper import HyperSpace
from pipeline.hypergrad.problem import Problem
from pipeline.hypergrad.reverse import validation_gradient


def hypergradient(problem: Problem, l2: HyperSpace | None, w_before: torch.Tensor, w_T: torch.Tensor) -> dict:
    """`w_before` = w_{T-1}, `w_T` where training ended."""
    t = problem.steps - 1
    dw, d_direct, val_loss = validation_gradient(problem, w_T)
    l2 = l2.clone() if l2 is not None else None
    lambdas = [x.requires_grad_() for x in l2.values.values()] if l2 is not None else []
    theta = {n: b.detach().requires_grad_() for n, b in problem.buffers().items()}
    leaves = problem.leaves(w_before)
    g = problem.join(torch.autograd.grad(problem.train_loss(leaves, t, buffers=theta), leaves, create_graph=True))
    g = g + problem.l2_coefficients(l2) * w_before.detach()
    # d f / d theta through w_T: dw . d w_T / d theta, w_T = const - alpha (1 - beta) g(theta)
    moved = -(problem.alpha_at(t) * (1 - problem.beta[t].item()) * dw * g).sum()
    inputs = [*lambdas, *theta.values()]
    grads = torch.autograd.grad(moved, inputs, materialize_grads=True, allow_unused=True) if inputs else []
    grads = data_parallel.average(list(grads)) if grads else []
    d_l2, d_theta = grads[:len(lambdas)], grads[len(lambdas):]
    out = {"val_loss": val_loss, "reverse_steps": 1, "work": {"hvps": 1, "gradients": 1}}
    if l2 is not None:
        out["log10_l2"] = dict(zip(l2.values, d_l2))
    if problem.scales is not None:
        out["scale"] = problem.scales.reduce({n: d_direct[n] + d for n, d in zip(theta, d_theta)})
    return out
