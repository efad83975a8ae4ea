"""``normmatters bench``: the Lp normalizations against torch's own, in the same process.

Three suites, each a table on the terminal and rows in one JSON file (with the machine):

* ``layers`` — every family (batch 1d/2d/3d, layer, group, RMS norm) on the shapes of small and
  large networks, L1 / L∞ / Top(10) against torch's layer (``nn.BatchNorm*d``, ``nn.LayerNorm``,
  ``nn.GroupNorm``, ``nn.RMSNorm``): training forward+backward, and evaluation forward under
  ``no_grad``; ratio = ours / torch (≤ 1: ours is no slower), and the GB/s ours moves in training
  (read x, write y; read x and ∂L/∂y, write ∂L/∂x);
* ``overhead`` — the host cost of one call on a tiny tensor (µs, ours and torch's), where the
  Python around the kernel decides the speed;
* ``steps`` — whole training steps (forward, backward, SGD) of ``resnet1d`` (MNIST-1D shape
  128×1×40), ``resnet20`` (3×32×32, batch 128) and the embedded Transformer LM, each with L1 / L∞ /
  Top(10) against the same network with torch's norms, eager and (``--compile``) compiled.

Timings alternate ours and torch's within each repetition and report medians; on a shared machine
use ``--clock cpu --threads 1``.

Example::

    normmatters bench --suites layers overhead --threads 1 --clock cpu --json bench.json
    normmatters bench --suites steps --compile
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from ..kernels import available, get_backend
from ..kernels.bench import CLOCKS, format_table, machine, saved_bytes, time_interleaved, write_json
from ..nn import (
    LpBatchNorm1d,
    LpBatchNorm2d,
    LpBatchNorm3d,
    LpGroupNorm,
    LpLayerNorm,
    LpRMSNorm,
)

__all__ = ["main", "layer_rows", "overhead_rows", "step_rows", "GRID"]

NORMS = {"l1": (1, None), "linf": (math.inf, None), "top10": (math.inf, 10)}

#: (family, shape): the shapes of the speed issue, then smaller ones of every family.
GRID: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("batch", (128, 16, 40)), ("batch", (128, 64, 10)), ("batch", (32, 16, 8, 8)),
    ("batch", (128, 64, 8, 8)), ("batch", (128, 16, 32, 32)), ("layer", (16, 64, 64)),
    ("layer", (8, 512, 768)), ("group", (32, 64, 16, 16)), ("group", (8, 256, 14, 14)),
    ("batch", (128, 16)), ("batch", (32, 8, 20)), ("batch", (8, 8, 4, 4)), ("batch", (8, 8, 4, 4, 4)),
    ("layer", (4, 8, 32)), ("group", (8, 16, 8, 8)), ("group", (32, 64, 8, 8)),
    ("rms", (16, 64, 64)), ("rms", (8, 128, 256)),
)
LARGE = (("batch", (128, 64, 32, 32)),)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 128x64x32x32, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return shape


def _pair(family: str, shape: tuple[int, ...], p: float, k: int | None, device: torch.device,
          dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    if family == "batch":
        torch_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
        ours_cls = {2: LpBatchNorm1d, 3: LpBatchNorm1d, 4: LpBatchNorm2d, 5: LpBatchNorm3d}[len(shape)]
        return torch_cls(shape[1], **kw), ours_cls(shape[1], p=p, k=k, **kw)
    if family == "layer":
        return nn.LayerNorm(shape[-1], **kw), LpLayerNorm(shape[-1], p=p, k=k, **kw)
    if family == "group":
        g = next(g for g in (8, 4, 2, 1) if shape[1] % g == 0)   # GroupNorm(8) where it divides
        return nn.GroupNorm(g, shape[1], **kw), LpGroupNorm(g, shape[1], p=p, k=k, **kw)
    return nn.RMSNorm(shape[-1], **kw), LpRMSNorm(shape[-1], p=p, k=k, **kw)


def _repeats(numel: int, repeat: int) -> int:
    # Small tensors are cheap: more repetitions for the same wall time, steadier medians.
    return max(repeat, min(201, int(repeat * 2e5 / max(numel, 1))))


def layer_rows(grid: Sequence[tuple[str, tuple[int, ...]]], norms: Sequence[str], repeat: int,
               device: str = "cpu", dtype: torch.dtype = torch.float32,
               clock: str = "wall", channels_last: bool = False, warmup: int = 3
               ) -> list[dict[str, Any]]:
    """One row per (family, shape, norm): training fwd+bwd and no_grad evaluation, ours/torch."""
    dev = torch.device(device)
    tick = CLOCKS[clock]
    rows = []
    for family, shape in grid:
        x = torch.randn(shape, device=dev, dtype=dtype)
        if channels_last and len(shape) == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        g = torch.randn_like(x)
        reps = _repeats(x.numel(), repeat)
        for name in norms:
            p, k = NORMS[name]
            if k is not None and family == "batch" and k > x.numel() // shape[1]:
                continue
            ref, ours = _pair(family, shape, p, k, dev, dtype)

            def fb(m: nn.Module) -> Callable[[], None]:
                return lambda: m(x).backward(g)

            def ev(m: nn.Module) -> Callable[[], None]:
                def f() -> None:
                    with torch.no_grad():
                        m(x)
                return f

            ref.train(), ours.train()
            t_fb, o_fb = time_interleaved([fb(ref), fb(ours)], reps, warmup, dev, tick)
            saved = (saved_bytes(lambda: ours(x)), saved_bytes(lambda: ref(x)))
            ref.eval(), ours.eval()
            t_ev, o_ev = time_interleaved([ev(ref), ev(ours)], reps, warmup, dev, tick)
            x.grad = None
            nbytes = x.numel() * x.element_size()
            rows.append({
                "family": family, "shape": "x".join(map(str, shape)) + ("cl" if channels_last else ""),
                "norm": name, "dtype": str(dtype).split(".")[-1], "torch_train_us": t_fb * 1e6, "ours_train_us": o_fb * 1e6,
                "train_ratio": o_fb / t_fb, "torch_eval_us": t_ev * 1e6, "ours_eval_us": o_ev * 1e6,
                "eval_ratio": o_ev / t_ev, "ours_train_GBps": 5 * nbytes / o_fb / 1e9,
                "ours_saved_bytes": saved[0], "torch_saved_bytes": saved[1],
            })
    return rows


def overhead_rows(norms: Sequence[str], repeat: int, clock: str = "wall") -> list[dict[str, Any]]:
    """Host cost of one call on a tiny tensor, µs, for every family in train and eval."""
    tick = CLOCKS[clock]
    dev = torch.device("cpu")
    rows = []
    tiny = {"batch": (2, 4), "batch2d": (2, 4, 2, 2), "layer": (2, 8), "group": (2, 4, 2),
            "rms": (2, 8)}
    for label, shape in tiny.items():
        family = "batch" if label.startswith("batch") else label
        x = torch.randn(shape)
        xg = x.clone().requires_grad_(True)
        for name in norms:
            p, k = NORMS[name]
            if k is not None and k > 2:
                k = 2  # a tiny tensor has few values per statistic; Top(2) exercises the path
            ref, ours = _pair(family, shape, p, k, dev, torch.float32)
            row: dict[str, Any] = {"family": label, "shape": "x".join(map(str, shape)), "norm": name}
            for mode in ("train", "eval"):
                ref.train(mode == "train"), ours.train(mode == "train")

                def call(m: nn.Module, t: Tensor, grad: bool) -> Callable[[], None]:
                    if grad:
                        return lambda: m(t)
                    def f() -> None:
                        with torch.no_grad():
                            m(t)
                    return f

                for grad in (False, True):
                    key = f"{mode}{'_grad' if grad else ''}"
                    t_ref, t_ours = time_interleaved([call(ref, xg if grad else x, grad),
                                                      call(ours, xg if grad else x, grad)],
                                                     max(repeat, 301), 30, dev, tick)
                    row[f"torch_{key}_us"] = t_ref * 1e6
                    row[f"ours_{key}_us"] = t_ours * 1e6
                    row[f"{key}_ratio"] = t_ours / t_ref
            rows.append(row)
    return rows


def _step_model(name: str, norm: str) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    from ..convert import to_torch_norms
    from .models import create_model

    torch.manual_seed(0)
    if name == "transformer_lm":
        model = create_model(name, norm="l2" if norm == "torch" else norm, num_classes=96,
                             block_size=64)
        tokens = torch.randint(0, 96, (16, 64))

        def loss(m: nn.Module) -> Tensor:
            logits = m(tokens[:, :-1])
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    else:
        shape = (128, 1, 40) if name == "resnet1d" else (128, 3, 32, 32)
        kw = {"input_dims": 1} if name == "resnet1d" else {}
        model = create_model(name, norm="l2" if norm == "torch" else norm, **kw)
        xb = torch.randn(shape)
        yb = torch.randint(0, 10, (shape[0],))

        def loss(m: nn.Module) -> Tensor:
            return nn.functional.cross_entropy(m(xb), yb)
    if norm == "torch":
        model = to_torch_norms(model)
    return model.train(), loss


def _no_compile_caches():
    """Inductor's FX-graph and AOT-autograd caches off (a context manager)."""
    from contextlib import ExitStack

    stack = ExitStack()
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    for config, name in ((inductor_config, "fx_graph_cache"), (inductor_config, "fx_graph_remote_cache"),
                         (functorch_config, "enable_autograd_cache")):
        if hasattr(config, name):
            stack.enter_context(config.patch({name: False}))
    return stack


def step_rows(models: Sequence[str], norms: Sequence[str], repeat: int, clock: str = "wall",
              compiled: bool = False) -> list[dict[str, Any]]:
    """Whole training steps (forward, backward, SGD) against the torch-norm network."""
    tick = CLOCKS[clock]
    dev = torch.device("cpu")
    rows = []
    for name in models:
        modes = [False, True] if compiled else [False]
        for comp in modes:
            base_model, base_loss = _step_model(name, "torch")

            def step(m: nn.Module, lossf: Callable[[nn.Module], Tensor], opt: torch.optim.Optimizer
                     ) -> Callable[[], None]:
                def f() -> None:
                    opt.zero_grad(set_to_none=True)
                    lossf(m).backward()
                    opt.step()
                return f

            for norm in norms:
                ours, ours_loss = _step_model(name, norm)
                base = base_model
                if comp:
                    # A fresh cache per pair: the models share their forward code, and dynamo's
                    # recompile limit would otherwise send later models back to eager mode.
                    torch._dynamo.reset()
                    base, ours = torch.compile(base_model), torch.compile(ours)
                base_step = step(base, base_loss, torch.optim.SGD(base_model.parameters(), lr=1e-3))
                ours_step = step(ours, ours_loss, torch.optim.SGD(ours.parameters(), lr=1e-3))
                row = {"model": name, "mode": "compiled" if comp else "eager", "norm": norm}
                if comp:
                    # The first step compiles (forward and backward): its wall time, each network,
                    # both from scratch (the torch network was compiled for the previous norm: a
                    # cache hit would make its compile look free).
                    for key, first in (("torch_compile_s", base_step), ("ours_compile_s", ours_step)):
                        with _no_compile_caches():
                            t0 = time.perf_counter()
                            first()
                            row[key] = time.perf_counter() - t0
                    row["compile_ratio"] = row["ours_compile_s"] / row["torch_compile_s"]
                t_ref, t_ours = time_interleaved([base_step, ours_step], repeat, 2, dev, tick)
                row.update(torch_ms=t_ref * 1e3, ours_ms=t_ours * 1e3, ratio=t_ours / t_ref)
                rows.append(row)
    return rows


LAYER_COLUMNS = [("family", "family", ""), ("shape", "shape", ""), ("dtype", "dtype", ""), ("norm", "norm", ""),
                 ("torch train µs", "torch_train_us", ".0f"), ("ours", "ours_train_us", ".0f"),
                 ("ratio", "train_ratio", ".2f"), ("torch eval µs", "torch_eval_us", ".0f"),
                 ("ours", "ours_eval_us", ".0f"), ("ratio", "eval_ratio", ".2f"),
                 ("GB/s", "ours_train_GBps", ".2f")]
OVERHEAD_COLUMNS = [("family", "family", ""), ("norm", "norm", ""),
    ("train torch", "torch_train_us", ".1f"), ("ours", "ours_train_us", ".1f"), ("ratio", "train_ratio", ".2f"),
    ("train+grad torch", "torch_train_grad_us", ".1f"), ("ours", "ours_train_grad_us", ".1f"),
    ("ratio", "train_grad_ratio", ".2f"),
    ("eval torch", "torch_eval_us", ".1f"), ("ours", "ours_eval_us", ".1f"), ("ratio", "eval_ratio", ".2f")]
STEP_COLUMNS = [("model", "model", ""), ("mode", "mode", ""), ("norm", "norm", ""),
                ("torch ms", "torch_ms", ".1f"), ("ours ms", "ours_ms", ".1f"), ("ratio", "ratio", ".2f"),
                ("torch compile s", "torch_compile_s", ".1f"), ("ours compile s", "ours_compile_s", ".1f"),
                ("compile ratio", "compile_ratio", ".2f")]


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of ``normmatters bench``; returns the exit status."""
    out = out or sys.stdout
    ap = argparse.ArgumentParser(prog="normmatters bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", nargs="+", default=["layers", "overhead"],
                    choices=["layers", "overhead", "steps"])
    ap.add_argument("--families", "--kinds", nargs="+", default=None,
                    choices=["batch", "layer", "group", "rms"],
                    help="restrict the layers suite to these families")
    ap.add_argument("--shapes", nargs="+", type=_shape, default=None,
                    help="batch-norm shapes NxCx... for the layers suite (default: the grid)")
    ap.add_argument("--layer-shapes", nargs="+", type=_shape, default=None,
                    help="layer-norm shapes ...xD for the layers suite")
    ap.add_argument("--group-shapes", nargs="+", type=_shape, default=None,
                    help="group-norm shapes NxCx... for the layers suite (GroupNorm(8) where 8 "
                         "divides C)")
    ap.add_argument("--large", action="store_true", help="add 128x64x32x32 to the layers suite")
    ap.add_argument("--models", nargs="+", default=["resnet1d", "resnet20", "transformer_lm"])
    ap.add_argument("--compile", action="store_true", help="steps suite: also torch.compile'd")
    ap.add_argument("--dtype", "--dtypes", nargs="+", default=["float32"],
                    choices=["float32", "bfloat16", "float64"], help="layers suite dtypes")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    ap.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(NORMS))
    ap.add_argument("--repeat", type=int, default=21, help="timed repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                    help="wall time, or process CPU time (robust to other load; use --threads 1)")
    ap.add_argument("--channels-last", action="store_true", help="layers suite: channels-last 4-D inputs")
    ap.add_argument("--json", default="bench_norm_layers.json", help="where to write the rows")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        ap.error("--repeat must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtypes = [{"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[d]
              for d in args.dtype]
    dev = torch.device(args.device)
    if get_backend() == "auto" and not all(available(dev, d) for d in dtypes):
        print(f"warning: fused kernels unavailable on {dev}; timing the reference path", file=out)
    info = machine(args.device)
    info["clock"] = args.clock
    print(f"# {info.get('cpu', platform.processor())}, {info['threads']} threads, torch "
          f"{torch.__version__}, device {args.device}, backend {get_backend()}, {args.clock} clock, "
          f"median of >= {args.repeat}", file=out)
    payload: dict[str, Any] = {"machine": info}
    if "layers" in args.suites:
        if args.shapes or args.layer_shapes or args.group_shapes:
            grid = ([("batch", s) for s in args.shapes or ()]
                    + [("layer", s) for s in args.layer_shapes or ()]
                    + [("group", s) for s in args.group_shapes or ()])
        else:
            grid = list(GRID) + (list(LARGE) if args.large else [])
        if args.families:
            grid = [(f, s) for f, s in grid if f in args.families]
        rows = [r for d in dtypes
                for r in layer_rows(grid, args.norms, args.repeat, args.device, d, args.clock,
                                    args.channels_last, args.warmup)]
        payload["layers"] = rows
        print("\n## layers: training fwd+bwd and no_grad evaluation (ratio = ours / torch)", file=out)
        print(format_table(rows, LAYER_COLUMNS), file=out)
    if "overhead" in args.suites:
        rows = overhead_rows(args.norms, args.repeat, args.clock)
        payload["overhead"] = rows
        print("\n## host overhead per call on a tiny tensor (µs; train, train with grad, eval)", file=out)
        print(format_table(rows, OVERHEAD_COLUMNS), file=out)
    if "steps" in args.suites:
        rows = step_rows(args.models, args.norms, max(3, args.repeat // 3), args.clock, args.compile)
        payload["steps"] = rows
        print("\n## whole training steps (ratio = ours / the torch-norm network)", file=out)
        print(format_table(rows, STEP_COLUMNS), file=out)
    if args.json:
        write_json(args.json, payload)
        print(f"# wrote {args.json}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
