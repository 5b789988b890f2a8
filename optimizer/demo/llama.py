"""A small LLaMA-style decoder: RMSNorm, rotary positions, SwiGLU, no biases
(Touvron et al. 2023), sized by four numbers.

It computes in the dtype of its rotary tables (float32) whatever dtype its parameters are
stored in: :meth:`Llama.store_parameters` keeps the weights in bf16 (the demo's
``--param-dtype bf16``: the optimizer's only copy), and each layer casts its weight to
its input's dtype where it uses it (a no-op for float32 weights). The gradients are the
parameters' dtype. Computing in float32 keeps the experiment about how the weights are
stored and rounded, and fast on CPUs without bf16 units (there, a bf16 matmul runs tens
of times slower than a float32 one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles ``pos * base^(-2i/head_dim)``, shape (seq_len, head_dim / 2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of features of x (batch, heads, seq, head_dim) by its angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Linear(nn.Linear):
    """``nn.Linear`` in its input's dtype (weights stored in bf16 meet float32 activations as float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.out = Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = Linear(dim, hidden, bias=False)
        self.up = Linear(dim, hidden, bias=False)
        self.down = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only language model; ``forward(tokens, targets)`` returns (logits, loss)."""

    def __init__(self, vocab: int = 256, dim: int = 256, layers: int = 4, heads: int = 4, max_seq: int = 256) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"Invalid model size: dim={dim} must split into heads={heads} of even width")
        hidden = 64 * round(8 * dim / 3 / 64)  # SwiGLU's 2/3 of 4*dim, rounded to a multiple of 64
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = Linear(dim, vocab, bias=False)
        cos, sin = rotary_tables(max_seq, dim // heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        for block in self.blocks:  # scale the residual branches' outputs by depth (GPT-2)
            for w in (block.attn.out.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=0.02 / (2 * layers) ** 0.5)

    def store_parameters(self, dtype: torch.dtype) -> Llama:
        """Keep the parameters in ``dtype`` (rounded to nearest from their float32 initialisation); the
        model still computes in its rotary tables' float32. Returns the model."""
        for module in self.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.dtype != dtype:
                    module._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        return self

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        t = tokens.shape[1]
        x = F.embedding(tokens, self.embed.weight.to(self.cos.dtype))  # computes in the tables' dtype
        cos, sin = self.cos[:t], self.sin[:t]
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss
