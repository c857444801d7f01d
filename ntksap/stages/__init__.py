"""The work of each pipeline stage: one module per stage of ``dvc.yaml``, named after it.

Nothing is imported here, so a notebook that imports one stage does not import (or depend on) the others.
"""
