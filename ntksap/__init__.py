"""ntksap: foresight pruning with NTK-SAP (Wang, Li & Sun, ICLR 2023), its baselines and its successors.

The whole public surface::

    model = ntksap.build_model("resnet20", num_classes=10)
    masks = ntksap.prune(model, "ntksap", sparsity=0.8926, input_shape=(3, 32, 32))
    masks.report(model, (3, 32, 32))            # per-layer density and FLOPs
    masks.save("mask.pt"); ntksap.Masks.load("mask.pt")

Modules, one job each. The library: ``masks`` (mask sets), ``scores`` (one
score function per method and the registry ``METHODS``), ``paths`` (the
ReLU-path copies of a network that PX scores with), ``pruning`` (the
iterative loop and ``prune``), ``functional`` (the masked functional forward
that scores and ntk share), ``models`` (the paper's networks), ``data``
(datasets and device-side loaders), ``augment`` (training augmentation on
tensors), ``protocol`` (the training protocol), ``train`` (the resumable
trainer), ``stacked`` (the K networks of one curve as one module, for
training them at once), ``distributed`` (DDP training via torchrun), ``ntk`` (NTK matrices,
spectra, traces); small helpers ``checks`` (argument checking), ``devices``,
``hashing`` (tensor digests), ``files`` (atomic writes), ``profiling``.
The pipeline: ``params`` (+ ``schema``: the params.yaml models), ``config``
(its command line and Hydra composition), ``locations`` (where datasets live on
this machine), ``layout`` (result paths), ``experiment`` (what every stage
builds from params), ``stages.<name>`` (one module per DVC stage),
``results`` (collecting results, metrics), ``figures.<kind>`` (every plot),
``notebook`` (notebook set-up), ``execute`` (papermill's command line, as
dvc.yaml runs each notebook), ``code_deps`` (each stage's exact code deps), ``lab``
(the Jupyter kernel and the server setting that opens ``results/`` read-only).
"""

import importlib

_PUBLIC = {  # name -> the module that holds it; imported on first use (PEP 562), so that
    # `import ntksap.figures.style` does not import torch, the pruning loop and the models
    "Masks": "masks", "apply_masks": "masks", "enforce_masks_after_step": "masks",
    "from_torch_prune": "masks", "prunable_parameters": "masks", "to_torch_prune": "masks",
    "MODELS": "models", "build_model": "models", "default_input_shape": "models", "kaiming_init": "models",
    "prune": "pruning", "METHODS": "scores",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ntksap' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])


__all__ = [
    "METHODS", "MODELS", "Masks", "apply_masks", "build_model", "default_input_shape",
    "enforce_masks_after_step", "from_torch_prune", "kaiming_init", "prunable_parameters",
    "prune", "to_torch_prune",
]
__version__ = "0.1.0"
