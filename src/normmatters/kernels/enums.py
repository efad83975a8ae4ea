"""The integer codes the fused kernels take, shared by the Python wrappers, the C++
(``csrc/lp_norm_cpu.cpp``, which keeps plain ints and names these enums), Triton and the tests."""

from __future__ import annotations

from enum import IntEnum

import torch

__all__ = ["Layout", "Mode", "Affine", "DType", "DTYPE_CODES"]


class Layout(IntEnum):
    """How a dense ``[N, C, S]`` view is stored."""

    NCS = 0  #: each (n, c) a contiguous run of S values (NCHW; layer/group norm rows as N = 1)
    NSC = 1  #: each of the N·S rows holds C contiguous values (channels-last)


class Mode(IntEnum):
    """Which dispersion: L1, or Top(k) (L∞ is Top(1))."""

    L1 = 1
    TOPK = 2


class Affine(IntEnum):
    """Where γ and β live."""

    NONE = 0
    CHANNEL = 1  #: one per channel c (batch norm)
    POSITION = 2  #: one per position s (layer and RMS norm: NCS with N = 1)
    #: one per channel of a group norm: NCS with N = 1, rows of (sample, group), each row the
    #: group's channels as runs of equal length (the eager operators, csrc/lp_norm_op.cpp)
    GROUP = 3


class DType(IntEnum):
    """Storage dtype of a kernel build."""

    FLOAT32 = 0
    FLOAT64 = 1
    BFLOAT16 = 2
    FLOAT16 = 3


#: torch dtype → :class:`DType`.
DTYPE_CODES = {torch.float32: DType.FLOAT32, torch.float64: DType.FLOAT64,
               torch.bfloat16: DType.BFLOAT16, torch.float16: DType.FLOAT16}
