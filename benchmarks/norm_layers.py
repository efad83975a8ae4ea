"""Time the Lp normalization layers against torch's in one process (SPEC §7).

Same as ``normmatters bench``; see :mod:`normmatters.kernels.bench` for the options, e.g.::

    OMP_NUM_THREADS=2 python benchmarks/norm_layers.py --repeat 9 --json bench_norm_layers.json
    python benchmarks/norm_layers.py --kinds batch --shapes 128x64x32x32 --dtypes float32
    python benchmarks/norm_layers.py --device cuda --channels-last

It prints a table (times are medians; ratio = ours / torch, ≤ 1 meets the target) and writes the
rows with the machine description to a JSON file.
"""

from __future__ import annotations

import sys

from normmatters.kernels.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
