"""ntksap: foresight pruning with NTK-SAP (Wang, Li & Sun, ICLR 2023) and its baselines.

The whole public surface::

    model = ntksap.build_model("resnet20", num_classes=10)
    masks = ntksap.prune(model, "ntksap", sparsity=0.8926, input_shape=(3, 32, 32))
    masks.report(model, (3, 32, 32))            # per-layer density and FLOPs
    masks.save("mask.pt"); ntksap.Masks.load("mask.pt")

Modules: ``masks`` (mask sets), ``scores`` (one score function per method and
the registry ``METHODS``), ``pruning`` (the iterative loop and ``prune``),
``models`` (the paper's networks), ``data`` (datasets and device-side loaders),
``train`` (the resumable trainer), ``ntk`` (NTK matrices, spectra, traces),
``distributed`` (DDP training via torchrun), ``config``/``pipeline`` (the DVC
pipeline's parameters and helpers).
"""

from .masks import Masks, apply_masks, enforce_masks_after_step, from_torch_prune, prunable_parameters, to_torch_prune
from .models import MODELS, build_model, default_input_shape, kaiming_init
from .pruning import prune
from .scores import METHODS

__all__ = [
    "METHODS", "MODELS", "Masks", "apply_masks", "build_model", "default_input_shape",
    "enforce_masks_after_step", "from_torch_prune", "kaiming_init", "prunable_parameters",
    "prune", "to_torch_prune",
]
__version__ = "0.1.0"
