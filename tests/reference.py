"""Straightforward reference implementations used by the tests and benchmarks.

Written independently of ``ntksap.scores``: plain modules, deep copies, one
backward pass at a time, no ``functional_call``, no memory-format tricks.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ntksap.masks import prunable_modules


def _set_masked_weights(net: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Replace each prunable module's ``weight`` Parameter by a plain tensor."""
    for name, module in prunable_modules(net).items():
        key = f"{name}.weight" if name else "weight"
        if key in values:
            if "weight" in module._parameters:
                del module._parameters["weight"]
            module.weight = values[key]


def _two_pass_statistics(net_u, z):
    """The authors' recipe: a no-grad train-mode pass with momentum 1 sets each
    BN layer's running statistics (mean, unbiased variance) on ``z``."""
    for bn in _bns(net_u):
        bn.reset_running_stats()
        bn.momentum = 1.0
    net_u.train()
    with torch.no_grad():
        net_u(z)
    return [(bn.running_mean.clone(), bn.running_var.clone()) for bn in _bns(net_u)]


def _one_pass_statistics(net_u, z):
    """The fixed point "every BN layer normalises with the statistics (mean,
    unbiased variance) of its own input" in eval mode, found by iterating: each
    pass records every layer's input statistics and hands them to the next, so
    after as many passes as there are layers every layer's are exact."""
    bns = _bns(net_u)
    seen = {}
    hooks = [bn.register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, (args[0].detach().mean((0, 2, 3)),
                                                   args[0].detach().var((0, 2, 3), unbiased=True))))
        for i, bn in enumerate(bns)]
    net_u.eval()
    with torch.no_grad():
        for _ in range(len(bns) + 1):
            net_u(z)
            for i, bn in enumerate(bns):
                bn.running_mean, bn.running_var = seen[i][0].clone(), seen[i][1].clone()
    for h in hooks:
        h.remove()
    return [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]


def _bns(net):
    return [mod for mod in net.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]


def ntksap_batch_grad_reference(model, theta, masks, z, delta, statistics="two_pass"):
    """d/dm sum ||f(z; theta*m) - f(z; (theta+delta)*m)||^2 with two deep copies
    in eval mode sharing BN statistics of the unperturbed copy on ``z``:
    ``statistics="two_pass"`` the authors' recipe (a train-mode statistics pass
    first), ``"one_pass"`` each layer's own input statistics in the eval pass."""
    net_u = copy.deepcopy(model)
    net_p = copy.deepcopy(model)
    with torch.no_grad():
        for net in (net_u, net_p):
            for n, p in net.named_parameters():
                p.copy_(theta[n])
    m = {n: v.detach().clone().requires_grad_(True) for n, v in masks.items()}
    _set_masked_weights(net_u, {n: theta[n] * masks[n] for n in masks})
    stats = (_two_pass_statistics if statistics == "two_pass" else _one_pass_statistics)(net_u, z)
    for nets_bn in (_bns(net_u), _bns(net_p)):
        for bn, (mean, var) in zip(nets_bn, stats):
            bn.running_mean, bn.running_var = mean.clone(), var.clone()
    net_u.eval()
    net_p.eval()
    _set_masked_weights(net_u, {n: theta[n] * m[n] for n in masks})
    _set_masked_weights(net_p, {n: (theta[n] + delta[n]) * m[n] for n in masks})
    loss = ((net_u(z) - net_p(z)) ** 2).sum()
    loss.backward()
    return {n: m[n].grad.detach().clone() for n in masks}


def ntksap_reference(model, sparsity, input_shape, iterations, rounds, epsilon, num_samples, batch_size,
                     seed, init_fn, statistics="two_pass"):
    """Whole NTK-SAP prune with deep copies, drawing random numbers in the
    documented order (weights with ``init_fn`` on a copy, noise, perturbations
    in mask order). Returns (masks, scores of each iteration)."""
    torch.manual_seed(seed)
    names = [f"{n}.weight" if n else "weight" for n in prunable_modules(model)]
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    masks = {n: torch.ones(shapes[n]) for n in names}
    total = sum(masks[n].numel() for n in names)
    scratch = copy.deepcopy(model)
    history = []
    sizes = [batch_size] * (num_samples // batch_size) + ([num_samples % batch_size] if num_samples % batch_size else [])
    for t in range(1, iterations + 1):
        acc = {n: torch.zeros(shapes[n]) for n in names}
        for _ in range(rounds):
            for b in sizes:
                with torch.no_grad():
                    scratch.apply(init_fn)
                theta = {n: p.detach().clone() for n, p in scratch.named_parameters()}
                z = torch.randn((b, *input_shape))
                delta = {n: epsilon * torch.randn(shapes[n]) for n in names}
                g = ntksap_batch_grad_reference(model, theta, masks, z, delta, statistics)
                for n in names:
                    acc[n] += g[n]
        scores = {n: acc[n].abs() * masks[n] for n in names}
        history.append(scores)
        masks = topk_reference(scores, masks, round((1 - sparsity) ** (t / iterations) * total))
    return masks, history


def topk_reference(scores, masks, k):
    """Keep the k best live scores (ties: lower flat index first) with numpy lexsort."""
    names = list(masks)
    s = np.concatenate([scores[n].detach().double().numpy().ravel() for n in names])
    alive = np.concatenate([masks[n].numpy().ravel() for n in names]) != 0
    s = np.where(alive, s, -np.inf)
    order = np.lexsort((np.arange(s.size), -s))  # primary: -score, secondary: index
    keep = np.zeros(s.size, dtype=np.float32)
    keep[order[:k]] = 1
    out, i = {}, 0
    for n in names:
        out[n] = torch.from_numpy(keep[i:i + masks[n].numel()].reshape(masks[n].shape).copy())
        i += masks[n].numel()
    return out
