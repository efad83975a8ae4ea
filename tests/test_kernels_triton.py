"""The Triton kernels (normmatters.kernels.triton_kernels) on the CPU with TRITON_INTERPRET=1.

Triton chooses the interpreter when a kernel is decorated, so the checks run in a fresh Python
process with the variable set. They compare the kernels' forward (output and σ̂) and closed-form
backward (∂x, ∂γ, ∂β) against autograd through the reference path, for NCHW and channels-last
layouts, L1 / L∞ / Top(k), with and without centring (batch vs RMS norm), in float32 (1e-5) and
bfloat16 (output rounding only), and stay finite on values near float32's maximum. Timing
needs a GPU and is not tested.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    r"""
    import math
    import torch
    from normmatters.functional.constants import lp_constant
    from normmatters.functional.norm import _reference_lp_batch_norm, _reference_lp_rms_norm
    from normmatters.kernels import triton_kernels as tk

    torch.manual_seed(0)
    checked = 0
    for dtype, atol, rtol in [(torch.float32, 1e-5, 0.0), (torch.bfloat16, 0.05, 0.02)]:
        for layout in (0, 1):
            for p, k in [(1, None), (math.inf, None), (math.inf, 4)]:
                mode, kk = (1, 1) if p == 1 else (2, 1 if k is None else k)
                # ---- batch norm: statistics per channel over N·S values
                x = (torch.randn(3, 5, 24, dtype=torch.float64) * 2 + 1).to(dtype)
                g = torch.randn(3, 5, 24).to(dtype)
                if layout == 1:
                    x = x.transpose(1, 2).contiguous().transpose(1, 2)
                    g = g.transpose(1, 2).contiguous().transpose(1, 2)
                w = torch.randn(5, requires_grad=True)
                b = torch.randn(5, requires_grad=True)
                xr = x.detach().clone().requires_grad_(True)
                ref = _reference_lp_batch_norm(xr, None, None, w, b, True, p=p, k=k)
                rgx, rgw, rgb = torch.autograd.grad(ref, (xr, w, b), g)
                c = lp_constant(p, k, 72)
                y, mean, inv, sigma = tk.forward(x, layout, w.detach(), b.detach(), mode, kk, c, 1e-5, True)
                assert y.stride() == x.stride() and y.dtype == x.dtype
                torch.testing.assert_close(y, ref.detach(), atol=atol, rtol=rtol)
                dx, dw, db = tk.backward(g, x, layout, w.detach(), mean, inv, mode, kk, c, True, True, True)
                torch.testing.assert_close(dx, rgx, atol=atol, rtol=rtol)
                torch.testing.assert_close(dw, rgw, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(db, rgb, atol=1e-4, rtol=1e-4)
                checked += 1
                # ---- RMS norm (no centring), rows of 16 values as an NCS [1, rows, 16] tensor
                if layout == 0:
                    r = (torch.randn(6, 16, dtype=torch.float64) + 0.5).to(dtype)
                    gr = torch.randn(6, 16).to(dtype)
                    rr = r.detach().clone().requires_grad_(True)
                    ref = _reference_lp_rms_norm(rr, (16,), None, 1e-5, p=p, k=k)
                    (rg,) = torch.autograd.grad(ref, rr, gr)
                    c = lp_constant(p, k, 16)
                    y, mean, inv, _ = tk.forward(r.view(1, 6, 16), 0, None, None, mode, kk, c, 1e-5, False)
                    torch.testing.assert_close(y.view(6, 16), ref.detach(), atol=atol, rtol=rtol)
                    dx, _, _ = tk.backward(gr.view(1, 6, 16), r.view(1, 6, 16), 0, None, mean, inv,
                                           mode, kk, c, False, True, False)
                    torch.testing.assert_close(dx.view(6, 16), rg, atol=atol, rtol=rtol)
                    checked += 1
    # ---- values near float32's maximum: the sums stay finite wherever torch's layer does
    huge = torch.randn(4, 3, 16).clamp(-1.5, 1.5) * 1e38  # |x − μ| stays below 3.4e38
    want = torch.nn.functional.batch_norm(huge, None, None, training=True)
    assert torch.isfinite(want).all()
    for p, k in [(1, None), (math.inf, None), (math.inf, 4)]:
        mode, kk = (1, 1) if p == 1 else (2, 1 if k is None else k)
        c = lp_constant(p, k, 64)
        y, mean, inv, sigma = tk.forward(huge, 0, None, None, mode, kk, c, 1e-5, True)
        assert torch.isfinite(y).all() and torch.isfinite(mean).all(), p
        ref = _reference_lp_batch_norm(huge.double(), None, None, None, None, True, p=p, k=k)
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
        g = torch.randn(4, 3, 16)
        dx, dw, db = tk.backward(g, huge, 0, None, mean, inv, mode, kk, c, True, True, True)
        assert torch.isfinite(dx).all(), p
        checked += 1
    print("checked", checked)
    """
)


def test_triton_kernels_match_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "checked 21" in proc.stdout
