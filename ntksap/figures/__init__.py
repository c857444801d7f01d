"""Every figure of the pipeline, one module per subject; importing one does not import the others.

``palette`` (the colours), ``style`` (theme, saving, the paper's sparsity axis), ``accuracy`` (Figure 1
panels, learning curves), ``pruning`` (layer-wise density, scores, the NTK while pruning), ``spectra``
(Figure 2).
"""
