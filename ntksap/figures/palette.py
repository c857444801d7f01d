"""The colours of every figure: seaborn's ``colorblind`` palette, without importing seaborn.

A module of its own so that a notebook's plot style (``ntksap.notebook.setup``) does not make the
stages that draw no saved figure depend on the figure code.
"""

COLORS = ["#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133",
          "#56b4e9"]
"""seaborn's ``colorblind`` palette."""
