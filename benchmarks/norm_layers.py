"""Time the Lp normalization layers (and whole training steps) against torch's in one process.

Same as ``normmatters bench``; see :mod:`normmatters.experiments.bench_steps` for the options, e.g.::

    python benchmarks/norm_layers.py --threads 1 --clock cpu --json bench_norm_layers.json
    python benchmarks/norm_layers.py --suites layers --shapes 128x64x32x32 --large
    python benchmarks/norm_layers.py --suites steps --compile
    python benchmarks/norm_layers.py --device cuda --channels-last

It prints tables (times are medians; ratio = ours / torch, ≤ 1 means ours is no slower) and
writes the rows with the machine description to a JSON file.
"""

from __future__ import annotations

import sys

from normmatters.experiments.bench_steps import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
