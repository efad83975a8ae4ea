"""A decoder-only Transformer language model with Lp layer norm (claims C2 and C5).

Pre-norm blocks as in GPT-2 / nanoGPT: x + Attn(LN(x)), x + MLP(LN(x)), a final LN and a head
tied to the token embedding. Every LN is built by the norm factory: ``"l1"`` gives an L1 layer
norm (σ̂ = C_L1 · mean|d| over the features), ``"linf"``/``"top{k}"`` the L∞/Top(k) layer norm,
``"wn"``/``"bwn"`` normalize the weights of the attention and MLP projections instead and leave
a learned gain and bias where the LN was.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norms import NormFactory

__all__ = ["TransformerLM", "transformer_lm"]


class _Block(nn.Module):
    def __init__(self, f: NormFactory, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = f.layer_norm(d_model)
        self.qkv = f.linear(d_model, 3 * d_model)
        self.proj = f.linear(d_model, d_model)
        self.ln2 = f.layer_norm(d_model)
        self.fc1 = f.linear(d_model, 4 * d_model)
        self.fc2 = f.linear(4 * d_model, d_model)
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class TransformerLM(nn.Module):
    """Decoder-only Transformer over tokens.

    :param vocab_size: number of token ids.
    :param block_size: longest context (learned position embeddings).
    :param n_layer, n_head, d_model: depth, heads, width (``d_model % n_head == 0``).
    :param dropout: dropout on embeddings, attention and residual branches.

    Input (N, T) token ids, output (N, T, vocab_size) logits.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        dropout: float = 0.1,
        norm: str | NormFactory = "l2",
        norm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"TransformerLM: d_model ({d_model}) must be divisible by n_head ({n_head})")
        f = norm if isinstance(norm, NormFactory) else NormFactory(norm, norm_kwargs)
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(f, d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = f.layer_norm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying (Press & Wolf 2017)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        for name, p in self.named_parameters():
            # GPT-2's scaled init of the residual projections keeps the stream's variance O(1).
            if name.endswith(("proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"TransformerLM: sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def transformer_lm(*, norm="l2", num_classes=256, vocab_size=None, norm_kwargs=None, in_channels=None, input_dims=None, **kw):
    """A small Transformer LM (4 layers, 4 heads, width 128 by default); ``vocab_size`` defaults to ``num_classes``."""
    return TransformerLM(vocab_size or num_classes, norm=norm, norm_kwargs=norm_kwargs, **kw)
