"""Deploy a trained L1-batch-norm ResNet and a BWN ResNet: fold, export to ONNX, compare, time.

For each normalization ("l1": L1 batch norm; "bwn": bounded weight norm + mean-only batch norm)
this script, in one process:

1. trains the small digits ResNet (``resnet_digits``, ResNet-8) on scikit-learn's 8×8 handwritten
   digits (real data, embedded in scikit-learn: no network);
2. folds it (:func:`normmatters.deploy.fold_norms`) and exports it to ONNX
   (:func:`normmatters.deploy.export_onnx`, ``torch.onnx.export(..., dynamo=True)``);
3. reports test accuracy, the max |output| difference torch vs folded vs onnxruntime on the whole
   test split, the size (parameters, norm layers, state-dict and ONNX bytes) and the latency of the
   unfolded model, the folded model and onnxruntime, side by side.

Run::

    OMP_NUM_THREADS=1 python benchmarks/deploy.py                  # ~1 minute on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/deploy.py --epochs 2 --json out/deploy.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normmatters.deploy import export_onnx, fold_norms
from normmatters.experiments.models import create_model

NORM_CLASSES = ("BatchNorm", "MeanOnly", "Frozen", "LayerNorm", "GroupNorm", "RMSNorm")


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, scaled to [0, 1], split 75 / 25 with a fixed permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.75 * len(y))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> float:
    """SGD with momentum and a cosine schedule; returns the wall time in seconds."""
    g = torch.Generator().manual_seed(seed)
    batch = 64  # examples per step
    steps = epochs * ((len(y) + batch - 1) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - t0


def latency_ms(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median wall time of one call of each function, in milliseconds.

    The functions are timed in interleaved rounds (a, b, c, a, b, c, ...) so that a change in the
    machine's load during the measurement affects all of them alike.
    """
    for fn in fns.values():
        for _ in range(2):  # warm-up
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def state_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def count(model: nn.Module) -> dict[str, int]:
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "buffer_elements": sum(b.numel() for b in model.buffers()),
        "norm_layers": sum(1 for m in model.modules() if any(c in type(m).__name__ for c in NORM_CLASSES)),
        "state_dict_bytes": state_bytes(model),
    }


def run_one(norm: str, data, args, out_dir: Path) -> dict:
    import onnxruntime as ort

    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = create_model("resnet_digits", norm=norm, num_classes=10, in_channels=1)
    train_s = train(model, x_train, y_train, args.epochs, args.lr, args.seed)
    model.eval()

    folded, report = fold_norms(model, x_test[:256], return_report=True)
    onnx_path = out_dir / f"resnet_digits_{norm}.onnx"
    exported = export_onnx(model, x_test[:64], onnx_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name

    def run_ort(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {in_name: x.numpy()})[0]

    with torch.inference_mode():
        out_torch = model(x_test)
        out_folded = folded(x_test)
    out_ort = torch.from_numpy(run_ort(x_test))

    def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).abs().max())

    def acc(out: torch.Tensor) -> float:
        return float((out.argmax(1) == y_test).float().mean())

    timings = {}
    for batch in args.batches:
        xb = x_test[:batch]
        with torch.inference_mode():
            t = latency_ms({"unfolded": model, "folded": folded, "ort": run_ort}, xb, args.repeats)
        t_model, t_folded, t_ort = t["unfolded"], t["folded"], t["ort"]
        timings[str(batch)] = {"unfolded_ms": t_model, "folded_ms": t_folded, "onnxruntime_ms": t_ort,
                               "speedup_folded": t_model / t_folded, "speedup_onnxruntime": t_model / t_ort}
    return {
        "norm": norm,
        "train_seconds": train_s,
        "test_accuracy": {"torch": acc(out_torch), "folded": acc(out_folded), "onnxruntime": acc(out_ort)},
        "max_abs_diff": {"torch_vs_folded": maxdiff(out_torch, out_folded),
                         "torch_vs_onnxruntime": maxdiff(out_torch, out_ort),
                         "folded_vs_onnxruntime": maxdiff(out_folded, out_ort),
                         "max_abs_logit": float(out_torch.abs().max())},
        "folded_pairs": len(report.folded),
        "baked_weight_norms": len(report.baked),
        "left_unfolded": [f"{n}: {r}" for n, r in report.skipped],
        "size": {"unfolded": count(model), "folded": count(folded), "onnx_file_bytes": exported.file_bytes},
        "latency": timings,
    }


def print_result(r: dict) -> None:
    d, s, a = r["max_abs_diff"], r["size"], r["test_accuracy"]
    print(f"\n== resnet_digits, norm={r['norm']}  (trained {r['train_seconds']:.1f} s)")
    print(f"test accuracy   torch {a['torch']:.4f}   folded {a['folded']:.4f}   onnxruntime {a['onnxruntime']:.4f}")
    print(f"max |diff|      torch-folded {d['torch_vs_folded']:.2e}   torch-onnxruntime {d['torch_vs_onnxruntime']:.2e}"
          f"   folded-onnxruntime {d['folded_vs_onnxruntime']:.2e}   (max |logit| {d['max_abs_logit']:.1f})")
    print(f"folded {r['folded_pairs']} conv+norm pairs, baked {r['baked_weight_norms']} weight norms")
    for line in r["left_unfolded"]:
        print(f"  left as is: {line}")
    u, f = s["unfolded"], s["folded"]
    print(f"{'size':16s}{'unfolded':>14s}{'folded':>14s}")
    for key in ("parameters", "buffer_elements", "norm_layers", "state_dict_bytes"):
        print(f"{key:16s}{u[key]:>14,d}{f[key]:>14,d}")
    print(f"{'onnx_file_bytes':16s}{'':>14s}{s['onnx_file_bytes']:>14,d}")
    print(f"{'latency (ms)':16s}{'unfolded':>10s}{'folded':>10s}{'ort':>10s}{'x folded':>10s}{'x ort':>8s}")
    for batch, t in r["latency"].items():
        print(f"{'batch ' + batch:16s}{t['unfolded_ms']:>10.3f}{t['folded_ms']:>10.3f}{t['onnxruntime_ms']:>10.3f}"
              f"{t['speedup_folded']:>10.2f}{t['speedup_onnxruntime']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norms", nargs="+", default=["l1", "bwn"], help="normalizations to deploy")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (1347 examples each)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate per batch of 64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="batch sizes timed")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--onnx-dir", type=Path, default=None, help="keep the ONNX files here")
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = load_digits_split(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); digits train {len(data[1])}, "
          f"test {len(data[3])}")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.onnx_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = [run_one(norm, data, args, out_dir) for norm in args.norms]
    for r in results:
        print_result(r)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp_path.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "args": {k: str(v) for k, v in vars(args).items()},
                                        "results": results}, indent=2))
        os.replace(tmp_path, args.json)


if __name__ == "__main__":
    main()
