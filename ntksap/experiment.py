"""What every stage builds from the parameters: the dataset, the network at its init, probe inputs, prune options."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .params import Params


def load_dataset(cfg: Params):
    """The experiment's dataset bundle, read from the prepare stage's file
    ``data/prepared/<dataset>.pt`` (:func:`ntksap.stages.prepare.load_prepared`),
    which the prune, train and spectrum stages depend on. Outside ``dvc repro``
    (a notebook run by hand, a test) a missing file is prepared first, from
    where this machine keeps the dataset (:mod:`ntksap.locations`)."""
    from .layout import prepared_path
    from .stages.prepare import load_prepared, prepare

    path = prepared_path(cfg.dataset)
    if not path.is_file():
        print(f"preparing {cfg.dataset} into {path} (the prepare stage's output)", flush=True)
        prepare(cfg.dataset, path)
    return load_prepared(path)


def new_model(cfg: Params, num_classes: int, seed: int):
    """The experiment's network with the init of ``seed`` (the same for every run)."""
    import torch

    from .models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg.model, num_classes)


def probe_inputs(bundle, n: int, seed: int = 0):
    """``n`` test inputs (a fixed random subset, normalised as in training) to
    probe the NTK with: float32 (n, C, H, W) on the CPU."""
    import torch

    from .data import normalise

    g = torch.Generator().manual_seed(10_000 + seed)
    n = min(n, bundle.num_test)
    idx = torch.randperm(bundle.num_test, generator=g)[:n]
    if bundle.on_disk:  # ImageNet: read and transform a few validation images
        return torch.stack([bundle.test_set[i][0] for i in idx.tolist()])
    return normalise(bundle, bundle.test_images[idx])


def prune_kwargs(cfg: Params, run: str, seed: int, input_shape, data=None, device=None) -> dict:
    """Keyword arguments of :func:`ntksap.prune` for one run of the experiment
    (``None`` settings are the method's paper defaults)."""
    r = cfg.runs[run]
    return dict(input_shape=tuple(input_shape), data=data, iterations=r.iterations, rounds=r.rounds,
                epsilon=r.epsilon, num_samples=cfg.prune.num_samples, batch_size=cfg.prune.batch_size, seed=seed,
                scope=cfg.prune.scope, schedule=cfg.prune.schedule, redraw=r.weights == "redraw",
                noise_inputs=r.inputs == "noise", bn_mode=r.bn_mode, count_rule=cfg.prune.count_rule,
                device=device, progress=False, apply=False)
