"""``normmatters reproduce``: run the paper's claims C1–C5 and write one report (Hoffer et al. 2018).

::

    normmatters reproduce                                   # every claim, its own seeds (C2 5, the others 3)
    normmatters reproduce --quick                           # one seed: minutes, every verdict inconclusive
    normmatters reproduce --claims C2,C3 --seeds 5          # two claims, five seeds each
    normmatters reproduce --scale paper --data-root /data   # the paper's configurations where data is present

The embedded scale (default) trains on data that needs no network (MNIST-1D, scikit-learn's
digits, CPython's pydoc text) and is sized so that the default run finishes within 15 minutes on
a 2-core CPU (about 1750 CPU-seconds; one seed of everything in about 6 minutes). Each claim runs the seeds its verdict needs (``ClaimInfo.seeds``:
5 for C2, whose core comparisons are designed to be decided, 3 for the others) unless ``--seeds N``
gives every claim N. Verdicts come from paired comparisons over the seeds (see
:mod:`normmatters.experiments.claims.verdicts`); with one seed there is no interval and every
comparison is inconclusive. The paper scale trains the paper's networks on CIFAR-10, ImageNet and
a text corpus found under ``--data-root`` and lists what is missing, with how to provide it.

Output folder::

    REPORT.md          a table per claim beside the paper's and seed 003's numbers, verdicts,
                       figures, environment, resolved configs, wall times
    results.json       the same for programs
    figures/           summary bar charts
    runs/              the shared run cache (one folder per configuration and seed)
    c1/ … c5/          each claim's folder: its own runs and figures, result.json when finished
    .normmatters-reproduce   the marker that says the folder is a reproduce report

The output folder must be new, empty, or a report folder written by ``normmatters reproduce``
(it holds the marker); any other folder is refused (one line, exit status 2, nothing written), so
a mistyped ``--out`` never mixes a report into someone else's files.

Parallel claims. ``--jobs N`` (default ``auto``: one per usable core, at most 4) runs N claims at
once, each in its own process with its share of the cores; small networks train faster as two
one-thread processes than as one two-thread process. Claims that need the same run (C2's and C3's
L2 baseline) share it through the run cache, whose lock makes the second wait for the first.

Continuing. A claim whose ``result.json`` was written for the same scale and seeds is not run
again (``--force`` runs it again); inside a claim, a finished run (its ``summary.json``) is read
back and an unfinished one resumes from its checkpoint. An interrupted reproduce therefore
continues where it stopped when started again with the same arguments.

Failures. A claim whose module is missing or raises is reported as "not run: <error>" (the
traceback is in its folder as ``error.txt``) and the other claims still run. The exit status is
0 when at least one claim ran, 1 when every requested claim failed, 2 for bad arguments and 130
when interrupted (after writing the report of what finished).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .claims import CLAIMS, SCALES, load_claim, missing_paper_data, paper_data, parse_claims, speed, verdict_for
from .claims.report import write_report
from .errors import ConfigError, InputError
from .io import atomic_write_text

__all__ = ["main", "build_parser", "reproduce", "check_out_dir", "RESULT_NAME", "MARKER_NAME", "DEFAULT_SEEDS"]

log = logging.getLogger(__name__)

PROG = "normmatters reproduce"
#: A finished claim's record in its folder.
RESULT_NAME = "result.json"
RUN_CACHE = "runs"
#: The file that marks a folder as a reproduce report (written before anything else).
MARKER_NAME = ".normmatters-reproduce"
#: Seeds per configuration of a claim that does not ask for more (``ClaimInfo.seeds``).
DEFAULT_SEEDS = 3


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``normmatters reproduce``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run the paper's claims C1–C5 and write REPORT.md and results.json.",
        epilog="Runs already finished in the output folder are reused, so an interrupted reproduce continues "
               "where it stopped. Claims: " + "; ".join(f"{c}: {i.title}" for c, i in CLAIMS.items()),
    )
    p.add_argument("--scale", choices=SCALES, default="embedded",
                   help="embedded (default: real data that needs no network, within 15 min on 2 CPU cores) or paper "
                        "(the paper's configurations, where the data is present)")
    p.add_argument("--claims", default=None, metavar="C1,C2,...",
                   help=f"comma-separated claims to run (default: all of {','.join(CLAIMS)})")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: reports/<scale>)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="seeds per configuration, 0..N-1, for every claim (default: each claim's own, "
                        + ", ".join(f"{c} {i.seeds}" for c, i in CLAIMS.items()) + "); verdicts compare runs of the "
                        "same seed and need N >= 2 for an interval")
    p.add_argument("--quick", action="store_true",
                   help="one seed for every claim (same as --seeds 1): under half the time, every verdict "
                        "inconclusive")
    p.add_argument("--data-root", dest="data_root", default=None, metavar="DIR",
                   help="paper scale: folder with cifar-10-batches-py/, imagenet/{train,val}/, lm_corpus.txt "
                        "(default $NORMMATTERS_CACHE_DIR/data)")
    p.add_argument("--jobs", default="auto", metavar="N",
                   help="claims run at the same time, each in its own process (default auto: one per usable CPU "
                        "core, at most 4; each process gets cores/N torch threads unless OMP_NUM_THREADS is set). "
                        "With N > 1 progress is one line per finished run instead of bars per epoch")
    p.add_argument("--force", action="store_true",
                   help="run every requested claim again even if its result.json exists (finished runs in the "
                        "run cache are still reused; delete the folder for a fresh start)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="also log every training epoch")
    return p


class _TqdmHandler(logging.Handler):
    """Log records written with ``tqdm.write``, so they do not break the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def _setup_logging(verbose: bool) -> logging.Handler:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("normmatters.experiments.claims", __name__):
        lg = logging.getLogger(name)
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
        lg.propagate = False
    if verbose:
        lg = logging.getLogger("normmatters.experiments.trainer")
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    return handler


def _teardown_logging(handler: logging.Handler) -> None:
    for name in ("normmatters.experiments.claims", __name__, "normmatters.experiments.trainer"):
        lg = logging.getLogger(name)
        if handler in lg.handlers:
            lg.removeHandler(handler)
        if name != "normmatters.experiments.trainer":
            lg.propagate = True


def _is_report_folder(root: Path) -> bool:
    """Whether ``root`` holds a report written by ``normmatters reproduce``: its marker, or (written
    before the marker existed) a results.json whose command is a reproduce command."""
    if (root / MARKER_NAME).is_file():
        return True
    try:
        meta = json.loads((root / "results.json").read_text(encoding="utf-8")).get("meta", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(meta, dict) and str(meta.get("command", "")).startswith("normmatters reproduce")


def check_out_dir(out_dir: str | Path) -> Path:
    """Check that ``out_dir`` may hold a report: absent, empty, or a report folder of this command.

    Nothing is created or changed here.

    :raises ConfigError: ``out_dir`` is a file, or a folder that holds anything else.
    """
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out: {root} is a file, not a folder")
    if root.is_dir():
        try:
            entries = sorted(p.name for p in root.iterdir())
        except OSError as exc:
            raise ConfigError(f"--out: cannot read {root} ({exc.strerror or exc})") from None
        if entries and not _is_report_folder(root):
            shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
            raise ConfigError(f"--out: {root} holds files that are not a normmatters reproduce report ({shown}); "
                              "choose a new or empty folder")
    return root


def _claim_out_dir(root: Path, meta: dict[str, Any]) -> None:
    """Create the report folder and its marker (the folder was checked by :func:`check_out_dir`)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not (root / MARKER_NAME).is_file():
            atomic_write_text(root / MARKER_NAME, json.dumps({"command": meta["command"], "scale": meta["scale"]}) + "\n")
    except OSError as exc:
        raise ConfigError(f"--out: cannot write to {root} ({exc.strerror or exc})") from None


def _load_finished(claim_dir: Path, scale: str, seeds: Sequence[int]) -> dict[str, Any] | None:
    """The record of a claim finished earlier with the same scale and seeds, or ``None``."""
    path = claim_dir / RESULT_NAME
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s is unreadable; the claim runs again", path)
        return None
    if not isinstance(rec, dict) or rec.get("status") != "ok":
        return None
    if rec.get("scale") != scale or list(rec.get("seeds", [])) != list(seeds):
        log.info("%s was written for scale %s, seeds %s; running again for scale %s, seeds %s", path,
                 rec.get("scale"), rec.get("seeds"), scale, list(seeds))
        return None
    return rec


def _call_kwargs(fn: Callable[..., Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The optional keywords ``fn`` accepts (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(extra)
    return {k: v for k, v in extra.items() if k in params}


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _check_result(cid: str, res: Any) -> dict[str, Any]:
    if not isinstance(res, dict):
        raise TypeError(f"{cid}: run() returned {type(res).__name__}, expected a dict with 'rows'")
    rows = res.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "run" in r for r in rows):
        raise TypeError(f"{cid}: run() returned no 'rows' list of dicts with a 'run' key")
    return res


def run_claim(cid: str, root: Path, *, scale: str, seeds: Sequence[int], progress: bool,
              data_root: str | None = None, force: bool = False,
              runner: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run (or reuse) one claim and return its record; never raises for a failing claim module.

    :param runner: the claim's ``run`` function (default: the registry's module).
    """
    claim_dir = root / cid.lower()
    if not force:
        rec = _load_finished(claim_dir, scale, seeds)
        if rec is not None:
            rec["reused"] = True
            log.info("%s: finished earlier, reusing %s (%.0f s then)", cid, claim_dir / RESULT_NAME,
                     rec.get("wall_time") or 0.0)
            return rec
    base = {"claim": cid, "scale": scale, "seeds": list(seeds), "dir": cid.lower(), "reused": False}
    if scale == "paper":
        missing = missing_paper_data(cid, data_root)
        if len(missing) == len(CLAIMS[cid].paper_data):
            names = ", ".join(d.name for d in missing)
            log.info("%s: not run, paper-scale data missing (%s)", cid, names)
            return {**base, "status": "error", "wall_time": 0.0, "error": f"data missing: {names}",
                    "missing_data": [d.to_dict() for d in missing]}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        fn = runner if runner is not None else load_claim(cid)
        kwargs = _call_kwargs(fn, {"cache_dir": root / RUN_CACHE, "data_root": data_root})
        claim_dir.mkdir(parents=True, exist_ok=True)
        res = _check_result(cid, fn(claim_dir, seeds=tuple(seeds), scale=scale, progress=progress, **kwargs))
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        wall = time.perf_counter() - t0
        claim_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(claim_dir / "error.txt", traceback.format_exc())
        log.error("%s: not run: %s (traceback in %s)", cid, _one_line(exc), claim_dir / "error.txt")
        rec = {**base, "status": "error", "wall_time": wall, "error": _one_line(exc)}
        if scale == "paper":
            rec["missing_data"] = [d.to_dict() for d in missing_paper_data(cid, data_root)]
        return rec
    wall = time.perf_counter() - t0
    rec = {**base, **{k: v for k, v in res.items() if k not in base}, "claim": cid, "status": "ok",
           "wall_time": wall, "cpu_time": time.process_time() - c0, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    rec.setdefault("figures", [])
    rec.setdefault("notes", "")
    atomic_write_text(claim_dir / RESULT_NAME, json.dumps(rec, indent=1, default=str) + "\n")
    return rec


def usable_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_jobs(jobs: int | str, n_claims: int) -> int:
    """``"auto"`` → one job per usable core (at most 4 and at most the number of claims); else ``int(jobs)``.

    :raises ConfigError: not ``"auto"`` and not an integer >= 1.
    """
    if isinstance(jobs, str):
        if jobs.strip().lower() == "auto":
            return max(1, min(usable_cpus(), 4, n_claims))
        try:
            jobs = int(jobs)
        except ValueError:
            raise ConfigError(f"--jobs: expected 'auto' or an integer >= 1, got {jobs!r}") from None
    if jobs < 1:
        raise ConfigError(f"--jobs: expected 'auto' or an integer >= 1, got {jobs}")
    return min(int(jobs), max(1, n_claims))


def _threads_per_job(jobs: int) -> int | None:
    """torch threads of each worker: its share of the cores, or ``None`` to keep OMP_NUM_THREADS."""
    return None if os.environ.get("OMP_NUM_THREADS") else max(1, usable_cpus() // jobs)


def _worker(cid: str, root: str, kwargs: dict[str, Any], threads: int | None, verbose: bool) -> dict[str, Any]:
    """One claim in a worker process (``reproduce --jobs N``)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    handler = _setup_logging(verbose)
    log.info("%s: started (process %d)", cid, os.getpid())
    try:
        return run_claim(cid, Path(root), **kwargs)
    finally:
        _teardown_logging(handler)


def _run_parallel(ids: list[str], root: Path, jobs: int, kwargs: dict[str, Any], seeds: dict[str, list[int]],
                  verbose: bool, results: dict[str, dict[str, Any]]) -> None:
    """Run the claims ``ids`` (claim ``c`` with ``seeds[c]``) in ``jobs`` processes, costliest first;
    fill ``results`` as they finish."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from tqdm.auto import tqdm

    # A process per job, each with its share of the cores: small networks use two processes
    # of one thread far better than one process of two threads.
    threads = _threads_per_job(jobs)
    order = sorted(ids, key=lambda c: -CLAIMS[c].cost)
    # "spawn": a forked child of a process that already started OpenMP threads can hang.
    ctx = mp.get_context("spawn")
    bar = tqdm(total=len(ids), desc="claims", unit="claim", disable=not kwargs.get("progress_bar", True),
               dynamic_ncols=True)
    kw = {k: v for k, v in kwargs.items() if k != "progress_bar"}
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    futures = {pool.submit(_worker, cid, str(root), dict(kw, seeds=seeds[cid]), threads, verbose): cid
               for cid in order}
    try:
        for fut in cf.as_completed(futures):
            cid = futures[fut]
            try:
                rec = fut.result()
            except Exception as exc:  # the worker process died (out of memory, killed)
                rec = {"claim": cid, "status": "error", "error": f"worker failed: {_one_line(exc)}",
                       "wall_time": None, "seeds": seeds[cid], "scale": kw["scale"]}
            results[cid] = rec
            bar.update(1)
            _log_done(cid, rec)
    except KeyboardInterrupt:
        # Stop the workers now; their runs keep their last checkpoints and resume next time.
        pool.shutdown(wait=False, cancel_futures=True)
        for child in mp.active_children():
            child.terminate()
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)


def _verdict_text(cid: str, rec: dict[str, Any]) -> str:
    """The claim's verdict in words; never raises (a claim module that no longer imports, e.g. edited
    while the runs went on, must not cost the report of the claims that finished)."""
    try:
        return verdict_for(cid, rec).verdict
    except Exception as exc:
        return f"inconclusive (the verdict rule failed: {_one_line(exc)})"


def _log_done(cid: str, rec: dict[str, Any]) -> None:
    if rec["status"] == "ok":
        log.info("%s: %s in %.0f s%s", cid, _verdict_text(cid, rec), rec.get("wall_time") or 0.0,
                 " (reused)" if rec.get("reused") else "")


def reproduce(
    out_dir: str | Path,
    *,
    claims: Sequence[str] | None = None,
    scale: str = "embedded",
    seeds: Sequence[int] | None = None,
    data_root: str | None = None,
    progress: bool = True,
    force: bool = False,
    command: str | None = None,
    runners: dict[str, Callable[..., dict[str, Any]]] | None = None,
    jobs: int | str = 1,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the claims and write the report; the library form of ``normmatters reproduce``.

    :param out_dir: the report folder: new, empty, or one this command wrote (see :func:`check_out_dir`).
    :param claims: claim ids (default all).
    :param scale: ``"embedded"`` or ``"paper"``.
    :param seeds: the seeds every configuration of every claim runs with; ``None``: claim ``c`` runs
        seeds ``0 .. CLAIMS[c].seeds − 1``.
    :param data_root: paper-scale data folder.
    :param progress: tqdm bars.
    :param force: run claims again even if finished.
    :param command: the command line, for the report.
    :param runners: claim id → ``run`` function, replacing the registry's (for tests; only with
        ``jobs=1``, as worker processes import the registry's modules).
    :param jobs: claims run at the same time in worker processes (``"auto"``: see
        :func:`resolve_jobs`); 1 runs them in this process, one after another.
    :param verbose: log every epoch.
    :returns: ``{"results": {claim: record}, "report": path, "json": path, "wall_time": s,
        "interrupted": bool, "paper_data": {name: status} or None}``.
    :raises ConfigError: bad arguments, or an ``out_dir`` that holds anything but a report.
    """
    if scale not in SCALES:
        raise ConfigError(f"--scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    ids = parse_claims(claims)
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ConfigError("--seeds: expected at least one seed")
    claim_seeds = {cid: list(seeds) if seeds is not None else list(range(CLAIMS[cid].seeds)) for cid in ids}
    seeds = seeds if seeds is not None else sorted({s for ss in claim_seeds.values() for s in ss})
    n_jobs = resolve_jobs(jobs, len(ids))
    if runners and n_jobs > 1:
        raise ConfigError("reproduce: runners= replaces claim modules in this process and needs jobs=1")
    root = check_out_dir(out_dir)
    meta: dict[str, Any] = {"scale": scale, "seeds": seeds, "claim_seeds": claim_seeds, "claims": ids,
                            "command": command or f"normmatters reproduce --scale {scale} --out {root}"}
    _claim_out_dir(root, meta)
    if scale == "paper":
        status = paper_data(data_root)
        meta["paper_data"] = {k: d.to_dict() for k, d in status.items()}
        meta["data_root"] = data_root
        for d in status.values():
            if not d.present:
                log.warning("paper scale: %s missing (%s: %s); to provide it: %s", d.name, d.path, d.detail, d.how)
    meta["jobs"] = n_jobs
    if n_jobs > 1:
        meta["threads_per_job"] = _threads_per_job(n_jobs) or os.environ.get("OMP_NUM_THREADS")
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    interrupted = False
    try:
        if n_jobs == 1:
            for i, cid in enumerate(ids, 1):
                log.info("%s [%d/%d]: %s", cid, i, len(ids), CLAIMS[cid].title)
                rec = run_claim(cid, root, scale=scale, seeds=claim_seeds[cid], progress=progress, data_root=data_root,
                                force=force, runner=(runners or {}).get(cid))
                results[cid] = rec
                _log_done(cid, rec)
        else:
            log.info("running %d claims in %d processes: %s", len(ids), n_jobs, ", ".join(ids))
            _run_parallel(ids, root, n_jobs, {"scale": scale, "progress": False, "data_root": data_root,
                                              "force": force, "progress_bar": progress}, claim_seeds, verbose, results)
    except KeyboardInterrupt:
        interrupted = True
        for cid in ids:
            results.setdefault(cid, {"claim": cid, "status": "error", "error": "interrupted; run the same command "
                                     "again to continue", "wall_time": None, "seeds": claim_seeds[cid],
                                     "scale": scale})
    results = {cid: results[cid] for cid in ids if cid in results}  # report in claim order
    meta["wall_time"] = time.perf_counter() - t0
    meta["claim_wall_time_total"] = sum((r.get("wall_time") or 0.0) for r in results.values())
    report, js = write_report(root, results, meta)
    return {"results": results, "report": report, "json": js, "wall_time": meta["wall_time"],
            "interrupted": interrupted, "paper_data": meta.get("paper_data")}


def main(argv: list[str] | None = None) -> int:
    """``normmatters reproduce``: returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    handler = _setup_logging(args.verbose)
    try:
        if args.seeds is not None and args.seeds < 1:
            raise ConfigError(f"--seeds: expected a number of seeds >= 1, got {args.seeds}")
        if args.quick and args.seeds not in (None, 1):
            raise ConfigError(f"--quick runs one seed; it contradicts --seeds {args.seeds}")
        n_seeds = 1 if args.quick else args.seeds
        claims = parse_claims(args.claims)
        out = Path(args.out) if args.out else Path("reports") / args.scale
        command = "normmatters reproduce " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
        out_info = reproduce(out, claims=claims, scale=args.scale, seeds=None if n_seeds is None else list(range(n_seeds)),
                             data_root=args.data_root, progress=args.progress, force=args.force,
                             command=command.strip(), jobs=args.jobs, verbose=args.verbose)
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _teardown_logging(handler)
    results = out_info["results"]
    width = max([len(c) for c in results] + [len("Speed")])
    for cid, rec in results.items():
        v = _verdict_text(cid, rec)
        t = rec.get("wall_time")
        print(f"{cid:<{width}}  {v}" + (f"  ({t:.0f} s{', reused' if rec.get('reused') else ''})" if t else ""))
    sv = speed.verdict(results)
    if sv is not None:
        print(f"{'Speed':<{width}}  {sv.verdict}")
    for d in (out_info.get("paper_data") or {}).values():
        if not d["present"]:
            print(f"missing paper-scale data: {d['name']} ({d['path']}: {d['detail']}); to provide it: {d['how']}")
    print(f"report: {out_info['report']} (total {out_info['wall_time']:.0f} s); machine-readable: {out_info['json']}")
    if out_info["interrupted"]:
        print(f"{PROG}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    if results and all(r.get("status") != "ok" for r in results.values()):
        return 1
    return 0
