"""A 2-layer LSTM language model whose weights can be (bounded) weight normalized (claim C5).

The LSTM is written out (one fused input projection per layer for the whole sequence, one
recurrent matrix product per step) so that its weights are ordinary :class:`~torch.nn.Linear`
weights a :mod:`torch.nn.utils.parametrize` parametrization can wrap, one per gate matrix, with
the input projection of a whole sequence fused into one matrix product. (``nn.LSTM``'s own weights
can be parametrized too — :func:`normmatters.parametrizations.weight_norm` handles
``weight_ih_l0`` and friends — but its fused kernel hides the per-step structure.)

Gates (Hochreiter & Schmidhuber 1997): [i, f, g, o] = W_ih x_t + W_hh h_{t-1} + b;
c_t = σ(f)·c_{t-1} + σ(i)·tanh(g); h_t = σ(o)·tanh(c_t).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from .norms import NormFactory

__all__ = ["LSTMLayer", "LSTMLM", "lstm_lm"]


class LSTMLayer(nn.Module):
    """One LSTM layer over (T, N, input_size) inputs."""

    def __init__(self, f: NormFactory, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        ih = nn.Linear(input_size, 4 * hidden_size)
        hh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        bound = hidden_size ** -0.5  # torch's nn.LSTM initialization
        for lin in (ih, hh):
            nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.zeros_(ih.bias)
        with torch.no_grad():
            ih.bias[hidden_size: 2 * hidden_size].fill_(1.0)  # forget-gate bias 1 (Jozefowicz et al. 2015)
        self.ih = f.weight(ih)
        self.hh = f.weight(hh)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        t_len, n, _ = x.shape
        if state is None:
            h = x.new_zeros(n, self.hidden_size)
            c = x.new_zeros(n, self.hidden_size)
        else:
            h, c = state
        gx = self.ih(x)
        w_hh = self.hh.weight.t()  # computed once per sequence, not once per step
        outs = []
        for t in range(t_len):
            i, fg, g, o = (gx[t] + h @ w_hh).chunk(4, dim=1)
            c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs), (h, c)


class LSTMLM(nn.Module):
    """Embedding → ``num_layers`` LSTM layers → linear head, with dropout between them.

    Input (N, T) token ids, output (N, T, vocab_size) logits.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_size: int = 128,
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout: float = 0.2,
        norm: str | NormFactory = "none",
        norm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        f = norm if isinstance(norm, NormFactory) else NormFactory(norm, norm_kwargs)
        if f.spec.kind == "lp":
            raise ConfigError(
                f"lstm_lm: norm must be 'none', 'wn' or 'bwn' (it normalizes weights), got {f.name!r}"
            )
        self.embed = nn.Embedding(vocab_size, embed_size)
        sizes = [embed_size] + [hidden_size] * num_layers
        self.layers = nn.ModuleList(LSTMLayer(f, sizes[i], sizes[i + 1]) for i in range(num_layers))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(idx)).transpose(0, 1)  # (T, N, E)
        with parametrize.cached():  # each weight is normalized once per forward pass
            for layer in self.layers:
                x, _ = layer(x)
                x = self.drop(x)
        return self.head(x.transpose(0, 1))


def lstm_lm(*, norm="none", num_classes=256, vocab_size=None, norm_kwargs=None, in_channels=None, input_dims=None, **kw):
    """A 2-layer LSTM LM (embedding 128, hidden 256); ``norm`` is ``"none"``, ``"wn"`` or ``"bwn"``."""
    return LSTMLM(vocab_size or num_classes, norm=norm, norm_kwargs=norm_kwargs, **kw)
