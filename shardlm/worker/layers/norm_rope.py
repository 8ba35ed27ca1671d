"""RMSNorm and rotary position embeddings, computed the way Hugging Face's Llama does."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.norm_act import PATHS
from ..weights import Reader
from .fp8 import E4M3Rows


class RMSNorm(nn.Module):
    """Replicated on every rank; normalises in float32, then scales in the model dtype. `add_norm` adds the
    residual first, in one kernel on the triton path (kernels/norm_act.py)."""

    def __init__(self, name: str, hidden: int, eps: float, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.name, self.hidden, self.eps = name, hidden, eps
        self.weight = nn.Parameter(torch.empty(hidden, device=device, dtype=dtype), requires_grad=False)
        self.use("torch")

    def use(self, backend: str) -> None:
        """Run add_norm on this path from now on ('torch' or 'triton')."""
        self._paths = PATHS[backend]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, e4m3: bool = False
                 ) -> tuple[torch.Tensor | E4M3Rows, torch.Tensor]:
        """(normed x + residual, x + residual) for rows [tokens, hidden]; residual None: x alone. e4m3: the
        normed rows quantised per token for the FP8 layer after the norm (takes_e4m3), as E4M3Rows."""
        fn = self._paths.add_rms_norm_e4m3 if e4m3 else self._paths.add_rms_norm
        return fn(x, residual, self.weight, self.eps)

    def load(self, reader: Reader) -> None:
        self.weight.data.copy_(reader.read(f"{self.name}.weight", (self.hidden,), None, 0, 0,
                                           self.weight.device, self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise, then scale in the model dtype, as HF does. rms_norm reads x in its own dtype and works
        # in float32 (HF's x.float() ... .to(dtype)) inside one kernel: no copies to and from float32
        return self.weight * F.rms_norm(x, (self.hidden,), eps=self.eps)


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per-pair rotary frequencies, with linear or Llama-3 scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the middle band interpolated
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to `max_positions`; a step looks up its positions once and
    every layer's attention rotates q and k with them (kernels/rope_cache.py)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 device: torch.device):
        super().__init__()
        inv = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)  # [pos, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [pos, d]
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(device), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the signed sin [-sin1, sin2], [tokens, 1, d], for these positions (see rope_cache.rotate)."""
        cos, sin = self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)
        half = sin.shape[-1] // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
