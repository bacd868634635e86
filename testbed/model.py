"""The testbed's model: a small decoder-only transformer with a per-request KV cache.

Real compute, random weights: the point is that a prefill chunk costs what a
prefill chunk costs (matmuls over every new token plus attention over the whole
cached context) and a decode step costs what a decode step costs, so the step
timings the hooks report are the same kind of numbers a real engine produces.
Weights come from a seeded generator, so two engines built with the same config
produce the same tokens.

Layout: pre-norm blocks (RMSNorm → causal multi-head attention with rotary
positions → RMSNorm → GELU MLP), untied output head. The linear layers
run batched over every token of a step; attention runs per request over that
request's own KV cache (queries at positions [start, start+n) see keys
[0, start+n) with a lower-right causal mask), so a prompt prefilled in chunks
attends to exactly what it would unchunked.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    """Size of the testbed model. Defaults: see DEFAULT_MODEL in engine.py for why."""

    vocab_size: int = 2048
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    #: Attention width is n_heads * head_dim, independent of d_model (0: d_model // n_heads).
    head_dim: int = 32
    d_ff: int = 1024
    max_context: int = 65536
    rope_theta: float = 10000.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_context"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelConfig:
        """The model the command line's size flags describe (``testbed serve`` and ``demo`` share them)."""
        return cls(
            vocab_size=args.vocab,
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=args.heads,
            head_dim=args.head_dim,
            d_ff=args.d_ff,
            max_context=args.max_context,
            seed=args.seed,
        )

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        return 2 * self.n_layers * self.attn_dim * torch.finfo(dtype).bits // 8

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """One request's keys and values for every layer: [layers, heads, capacity, head_dim].

    Capacity doubles when it runs out, so appending one decode token is amortised
    O(1) instead of a full copy per step.
    """

    __slots__ = ("k", "v", "length")

    def __init__(self, config: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (config.n_layers, config.n_heads, max(16, capacity), config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        new_cap = max(total, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.empty((*old.shape[:2], new_cap, old.shape[3]), device=old.device, dtype=old.dtype)
            new[:, :, : self.length].copy_(old[:, :, : self.length])
            setattr(self, name, new)

    def copy_prefix(self, n: int, extra: int = 0) -> KVCache:
        """A new cache holding the first n positions (room for `extra` more)."""
        out = KVCache.__new__(KVCache)
        cap = max(16, n + extra)
        shape = (*self.k.shape[:2], cap, self.k.shape[3])
        out.k = torch.empty(shape, device=self.k.device, dtype=self.k.dtype)
        out.v = torch.empty_like(out.k)
        out.k[:, :, :n].copy_(self.k[:, :, :n])
        out.v[:, :, :n].copy_(self.v[:, :, :n])
        out.length = n
        return out

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass(slots=True)
class ForwardItem:
    """One request's part of a forward: `tokens` at positions [kv.length, kv.length+len(tokens))."""

    kv: KVCache
    tokens: list[int]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class TinyTransformer:
    """Weights plus a forward over a batch of ForwardItems. Not an nn.Module: no autograd, no hooks."""

    def __init__(
        self, config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        # Drawn on the target device: a GPU-sized model initialises in a blink. The weights
        # for a seed are the same on every run on the same kind of device.
        gen = torch.Generator(device=self.device).manual_seed(config.seed)
        d, f, a = config.d_model, config.d_ff, config.attn_dim

        def rand(*shape: int, fan_in: int) -> torch.Tensor:
            w = torch.randn(*shape, generator=gen, dtype=torch.float32, device=self.device)
            return (w / math.sqrt(fan_in)).to(dtype=dtype)

        self.embed = rand(config.vocab_size, d, fan_in=1)
        self.layers = []
        for _ in range(config.n_layers):
            self.layers.append(
                {
                    "norm1": torch.ones(d, device=self.device, dtype=dtype),
                    "wqkv": rand(d, 3 * a, fan_in=d),
                    "wo": rand(a, d, fan_in=a),
                    "norm2": torch.ones(d, device=self.device, dtype=dtype),
                    "w1": rand(d, f, fan_in=d),
                    "w2": rand(f, d, fan_in=f),
                }
            )
        self.final_norm = torch.ones(d, device=self.device, dtype=dtype)
        # Untied output head: with a tied one the residual stream's own embedding wins
        # the argmax and greedy decoding just repeats the last token.
        self.lm_head = rand(d, config.vocab_size, fan_in=d)
        half = config.head_dim // 2
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))
        self._inv_freq = inv_freq.to(self.device)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity, self.device, self.dtype)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary positions on x [T, H, hd] (rotate-half form)."""
        angles = positions.to(torch.float32)[:, None] * self._inv_freq[None, :]  # [T, hd/2]
        cos = torch.cos(angles).to(x.dtype)[:, None, :]
        sin = torch.sin(angles).to(x.dtype)[:, None, :]
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem], all_logits: bool = False) -> list[torch.Tensor]:
        """Run one step: extend every item's KV cache by its tokens.

        Returns, per item, the logits of its last token [vocab] (or of all its
        tokens [n, vocab] with all_logits=True). Every item must have ≥ 1 token.
        """
        cfg = self.config
        lengths = [len(it.tokens) for it in items]
        starts = [it.kv.length for it in items]
        for it, start, n in zip(items, starts, lengths, strict=True):
            if n <= 0:
                raise ValueError("every forward item needs at least one token")
            if start + n > cfg.max_context:
                raise ValueError(f"context {start + n} exceeds the model's max_context {cfg.max_context}")
            it.kv.reserve(start + n)
        flat: list[int] = []
        pos: list[int] = []
        for it, start, n in zip(items, starts, lengths, strict=True):
            flat.extend(it.tokens)
            pos.extend(range(start, start + n))
        tok = torch.tensor(flat, dtype=torch.long, device=self.device)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        T, H, hd = len(flat), cfg.n_heads, cfg.head_dim
        x = self.embed[tok]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        masks: list[torch.Tensor | None] = []
        for start, n in zip(starts, lengths, strict=True):
            if n == 1:
                masks.append(None)  # one query sees every cached key: no mask needed
            else:
                q_pos = torch.arange(start, start + n, device=self.device)[:, None]
                k_pos = torch.arange(start + n, device=self.device)[None, :]
                masks.append(k_pos <= q_pos)
        for li, layer in enumerate(self.layers):
            h = _rms_norm(x, layer["norm1"])
            qkv = (h @ layer["wqkv"]).view(T, 3, H, hd)
            q = self._rope(qkv[:, 0], positions)
            k = self._rope(qkv[:, 1], positions)
            v = qkv[:, 2]
            outs = []
            for i, it in enumerate(items):
                a, b = offsets[i], offsets[i + 1]
                start, n = starts[i], lengths[i]
                it.kv.k[li, :, start : start + n].copy_(k[a:b].transpose(0, 1))
                it.kv.v[li, :, start : start + n].copy_(v[a:b].transpose(0, 1))
                kk = it.kv.k[li, :, : start + n]
                vv = it.kv.v[li, :, : start + n]
                qq = q[a:b].transpose(0, 1)  # [H, n, hd]
                # 4-D inputs: torch's CPU flash kernel takes them (3-D falls back to the
                # math path, ~3x slower at long context).
                o = F.scaled_dot_product_attention(qq[None], kk[None], vv[None], attn_mask=masks[i])[0]
                outs.append(o.transpose(0, 1).reshape(n, H * hd))
            attn = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
            x = x + attn @ layer["wo"]
            h = _rms_norm(x, layer["norm2"])
            x = x + F.gelu(h @ layer["w1"]) @ layer["w2"]
        for it, start, n in zip(items, starts, lengths, strict=True):
            it.kv.length = start + n
        if all_logits:
            h = _rms_norm(x, self.final_norm)
            logits = h @ self.lm_head
            return [logits[offsets[i] : offsets[i + 1]] for i in range(len(items))]
        last = torch.tensor([o - 1 for o in offsets[1:]], device=self.device)
        h = _rms_norm(x[last], self.final_norm)
        logits = h @ self.lm_head
        return list(logits.unbind(0))

    def greedy(self, logits: list[torch.Tensor]) -> list[int]:
        """Greedy sampling for a batch of last-token logits, one host transfer."""
        if not logits:
            return []
        return torch.stack(logits).argmax(dim=-1).tolist()
