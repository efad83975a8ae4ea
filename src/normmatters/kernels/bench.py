"""``normmatters bench``: time the Lp normalization layers against torch's in the same process.

For each shape and dtype, and each p (L1, L∞, Top(k)), the Lp layer and its torch counterpart
(:class:`torch.nn.BatchNorm2d` for batch norm, :class:`torch.nn.LayerNorm` for layer norm) are
timed in training mode, forward alone and forward+backward, alternating the two layers in every
repetition so that both see the same machine load; the table reports the medians, the ratio
ours/torch (≤ 1 means ours is no slower; SPEC §7), the achieved memory bandwidth (the bytes a
fused layer must move — forward: read x, write y; backward: read x and ∂L/∂y, write ∂L/∂x —
divided by the time), and the bytes each layer keeps for backward (measured with
:func:`torch.autograd.graph.saved_tensors_hooks`). A JSON file records the same rows with the
machine and versions.

Example::

    normmatters bench --repeat 9 --json bench.json
    python benchmarks/norm_layers.py --shapes 128x64x32x32 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import torch
from torch import Tensor, nn

__all__ = ["main", "run", "saved_bytes"]

SPEC_SHAPES = ("128x16x32x32", "128x64x32x32", "64x256x14x14")
LAYER_SHAPES = ("64x128x512",)
NORMS = {"l1": (1, None), "linf": (math.inf, None), "top10": (math.inf, 10)}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 128x64x32x32, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return shape


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of distinct storages that autograd keeps for backward while ``fn()`` runs forward."""
    storages: dict[tuple[int, str], int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[(s.data_ptr(), str(t.device))] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_pair(fns: Sequence[Callable[[], Any]], repeat: int, warmup: int,
               device: torch.device, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median seconds of each of ``fns``, interleaved within each repetition.

    The clock is wall time, or with ``--clock cpu`` the process's CPU time, which on a shared
    machine does not count the time other processes hold the cores (use it with one thread).
    """
    for _ in range(warmup):
        for f in fns:
            f()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, f in enumerate(fns):
            _sync(device)
            t0 = clock()
            f()
            _sync(device)
            times[i].append(clock() - t0)
    return [statistics.median(t) for t in times]


def _layers(kind: str, shape: tuple[int, ...], p: float, k: int | None, dtype: torch.dtype,
            device: torch.device) -> tuple[nn.Module, nn.Module]:
    from ..nn import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, LpLayerNorm

    kw = {"device": device, "dtype": dtype}
    if kind == "batch":
        bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
        lp = {2: LpBatchNorm1d, 3: LpBatchNorm1d, 4: LpBatchNorm2d, 5: LpBatchNorm3d}[len(shape)]
        return bn(shape[1], **kw), lp(shape[1], p=p, k=k, **kw)
    return nn.LayerNorm(shape[-1], **kw), LpLayerNorm(shape[-1], p=p, k=k, **kw)


def run(kind: str, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype],
        norms: Sequence[str], repeat: int = 7, warmup: int = 2, device: str = "cpu",
        channels_last: bool = False, with_reference: bool = False,
        clock: str = "wall") -> list[dict[str, Any]]:
    """Benchmark rows (one per shape × dtype × norm) for ``kind`` ``"batch"`` or ``"layer"``."""
    from . import use_backend

    dev = torch.device(device)
    tick = _CLOCKS[clock]
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            x = torch.randn(shape, device=dev, dtype=dtype)
            if channels_last and len(shape) == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            g = torch.randn_like(x)
            for name in norms:
                p, k = NORMS[name]
                ref, ours = _layers(kind, shape, p, k, dtype, dev)
                ref.train(), ours.train()

                def fwd(m: nn.Module = ref) -> Tensor:
                    return m(x)

                def fwd_ours(m: nn.Module = ours) -> Tensor:
                    return m(x)

                def fb(m: nn.Module = ref) -> None:
                    m(x).backward(g)

                def fb_ours(m: nn.Module = ours) -> None:
                    m(x).backward(g)

                t_f, o_f = _time_pair([fwd, fwd_ours], repeat, warmup, dev, tick)
                t_fb, o_fb = _time_pair([fb, fb_ours], repeat, warmup, dev, tick)
                nbytes = x.numel() * x.element_size()
                row = {
                    "kind": kind, "shape": list(shape), "dtype": str(dtype).split(".")[-1],
                    "norm": name, "channels_last": channels_last,
                    "torch_fwd_ms": t_f * 1e3, "ours_fwd_ms": o_f * 1e3,
                    "fwd_ratio": o_f / t_f,
                    "torch_fwdbwd_ms": t_fb * 1e3, "ours_fwdbwd_ms": o_fb * 1e3,
                    "fwdbwd_ratio": o_fb / t_fb,
                    "ours_fwd_GBps": 2 * nbytes / o_f / 1e9,
                    "ours_fwdbwd_GBps": 5 * nbytes / o_fb / 1e9,
                    "torch_fwdbwd_GBps": 5 * nbytes / t_fb / 1e9,
                    "torch_saved_bytes": saved_bytes(fwd),
                    "ours_saved_bytes": saved_bytes(fwd_ours),
                }
                if with_reference:
                    with use_backend("reference"):
                        (r_fb,) = _time_pair([fb_ours], max(1, repeat // 2), 1, dev, tick)
                        row["reference_fwdbwd_ms"] = r_fb * 1e3
                        row["reference_saved_bytes"] = saved_bytes(fwd_ours)
                x.grad = None
                rows.append(row)
    return rows


def _machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "device": device,
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of benchmark rows."""
    head = (f"{'kind':<5} {'shape':<15} {'dtype':<8} {'norm':<6} {'torch fwd':>9} {'ours fwd':>9} "
            f"{'ratio':>5} {'torch f+b':>9} {'ours f+b':>9} {'ratio':>5} {'GB/s':>6} "
            f"{'saved ours/torch MB':>19}")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"]) + ("cl" if r["channels_last"] else "")
        lines.append(
            f"{r['kind']:<5} {shape:<15} {r['dtype']:<8} {r['norm']:<6} "
            f"{r['torch_fwd_ms']:>7.2f}ms {r['ours_fwd_ms']:>7.2f}ms {r['fwd_ratio']:>5.2f} "
            f"{r['torch_fwdbwd_ms']:>7.2f}ms {r['ours_fwdbwd_ms']:>7.2f}ms {r['fwdbwd_ratio']:>5.2f} "
            f"{r['ours_fwdbwd_GBps']:>6.1f} "
            f"{r['ours_saved_bytes'] / 2**20:>9.2f}/{r['torch_saved_bytes'] / 2**20:<9.2f}"
            + (f" ref f+b {r['reference_fwdbwd_ms']:.1f}ms" if "reference_fwdbwd_ms" in r else ""))
    return "\n".join(lines)


def _write_json(path: str, payload: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of ``normmatters bench``; returns the exit status."""
    out = out or sys.stdout
    ap = argparse.ArgumentParser(prog="normmatters bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["batch", "layer"], choices=["batch", "layer"])
    ap.add_argument("--shapes", nargs="+", type=_shape, default=None,
                    help="batch-norm shapes NxCxHxW (default: the SPEC §7 ResNet shapes)")
    ap.add_argument("--layer-shapes", nargs="+", type=_shape, default=None,
                    help="layer-norm shapes ...xD (default: 64x128x512)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(_DTYPES))
    ap.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(NORMS))
    ap.add_argument("--repeat", type=int, default=7, help="timed repetitions (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", default="wall", choices=sorted(_CLOCKS),
                    help="wall time, or process CPU time (robust to other load; use --threads 1)")
    ap.add_argument("--channels-last", action="store_true", help="also time channels-last inputs")
    ap.add_argument("--with-reference", action="store_true",
                    help="also time the plain-torch reference path (slow)")
    ap.add_argument("--json", default="bench_norm_layers.json", help="where to write the rows")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        ap.error("--repeat must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from . import available, get_backend

    dev = torch.device(args.device)
    dtypes = [_DTYPES[d] for d in args.dtypes]
    if get_backend() == "auto" and not all(available(dev, d) for d in dtypes):
        print(f"warning: fused kernels unavailable on {dev}; timing the reference path", file=out)
    rows: list[dict[str, Any]] = []
    for kind in args.kinds:
        shapes = args.shapes or [_shape(s) for s in SPEC_SHAPES]
        if kind == "layer":
            shapes = args.layer_shapes or [_shape(s) for s in LAYER_SHAPES]
        layouts = [False, True] if (args.channels_last and kind == "batch") else [False]
        for cl in layouts:
            rows += run(kind, shapes, dtypes, args.norms, args.repeat, args.warmup, args.device,
                        cl, args.with_reference, args.clock)
    machine = _machine(args.device)
    machine["clock"] = args.clock
    print(f"# {machine.get('cpu', platform.processor())}, {machine['threads']} threads, "
          f"torch {torch.__version__}, device {args.device}, backend {get_backend()}, "
          f"{args.clock} clock, median of {args.repeat}", file=out)
    print(format_table(rows), file=out)
    if args.json:
        _write_json(args.json, {"machine": machine, "rows": rows})
        print(f"# wrote {args.json}", file=out)
    return 0
