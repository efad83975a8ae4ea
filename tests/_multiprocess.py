"""How the multi-process tests start their worker processes."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

import torch
import torch.multiprocessing as mp


def start_method(preload: Sequence[str]) -> str:
    """``"fork"`` where it is safe, else a forkserver that imports ``preload`` once.

    Forked children start in milliseconds with torch already imported (as in torch's own
    distributed tests); spawned ones re-import torch and normmatters, seconds each on a busy
    2-core machine. Fork only where it is safe (Linux, no other thread, CUDA untouched).
    """
    if sys.platform == "linux" and threading.active_count() == 1 and not torch.cuda.is_initialized():
        return "fork"
    if "forkserver" in mp.get_all_start_methods():
        mp.set_forkserver_preload(["torch", *preload])
        return "forkserver"
    return "spawn"
