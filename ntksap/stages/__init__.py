"""The work of each pipeline stage: one module per stage of ``dvc.yaml``, named after it.

Nothing is imported here, so a notebook that imports one stage does not import (or depend on) the others.
"""


def by_run(frames: dict):
    """One frame of the per-run ``frames`` (run -> ``pandas.DataFrame``) with a
    ``run`` column first, in the dict's order; empty ones add no row (when all
    are, the first one's columns remain). Used by the stages that cover every
    run of a seed."""
    import pandas as pd

    parts = [f.assign(run=run) for run, f in frames.items()]
    if not parts:
        return pd.DataFrame(columns=["run"])
    rows = [p for p in parts if not p.empty]
    f = pd.concat(rows, ignore_index=True) if rows else parts[0]
    return f[["run", *[c for c in f.columns if c != "run"]]]
