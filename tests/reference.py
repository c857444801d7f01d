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


def ntksap_batch_grad_reference(model, theta, masks, z, delta):
    """d/dm sum ||f(z; theta*m) - f(z; (theta+delta)*m)||^2 with two deep copies,
    following the authors' recipe: a no-grad train-mode pass with momentum 1 on
    the unperturbed copy sets BN statistics, then both copies run in eval mode
    sharing those statistics."""
    net_u = copy.deepcopy(model)
    net_p = copy.deepcopy(model)
    with torch.no_grad():
        for net in (net_u, net_p):
            for n, p in net.named_parameters():
                p.copy_(theta[n])
    m = {n: v.detach().clone().requires_grad_(True) for n, v in masks.items()}
    # BN statistics of the unperturbed network
    bns = [mod for mod in net_u.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = 1.0
    net_u.train()
    _set_masked_weights(net_u, {n: theta[n] * masks[n] for n in masks})
    with torch.no_grad():
        net_u(z)
    for bn_u, bn_p in zip(bns, [mod for mod in net_p.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]):
        bn_p.running_mean = bn_u.running_mean.clone()
        bn_p.running_var = bn_u.running_var.clone()
    net_u.eval()
    net_p.eval()
    _set_masked_weights(net_u, {n: theta[n] * m[n] for n in masks})
    _set_masked_weights(net_p, {n: (theta[n] + delta[n]) * m[n] for n in masks})
    loss = ((net_u(z) - net_p(z)) ** 2).sum()
    loss.backward()
    return {n: m[n].grad.detach().clone() for n in masks}


def ntksap_reference(model, sparsity, input_shape, iterations, rounds, epsilon, num_samples, batch_size,
                     seed, init_fn):
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
                g = ntksap_batch_grad_reference(model, theta, masks, z, delta)
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
