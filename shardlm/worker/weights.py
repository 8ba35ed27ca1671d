"""Checkpoint readers: each rank asks for slices of Hugging Face-named tensors and reads only those.

- SafetensorsReader: `get_slice` on memory-mapped files, so only the requested rows/columns load.
- GGUFReader: memory-mapped GGUF; rows of quantized tensors are cut before dequantizing, and the
  q/k rows llama.cpp interleaved for its rotary layout are put back in Hugging Face order.
- RandomReader: random values generated on the target device, each tensor whole, the rank keeping its slice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..common.config import ConfigError, ModelConfig


class WeightError(ConfigError):
    """A checkpoint that does not match the model config."""


class Reader:
    """Reads [start, end) along `dim` (None: whole tensor) of the tensor named `name`."""

    def read(self, name: str, shape: tuple[int, ...], dim: int | None, start: int, end: int,
             device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def fp8_scale_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of `<name>.weight_scale` where `<name>.weight` is stored in FP8 (e4m3), else None (a
        weight the loader quantises itself when FP8 is asked for)."""
        return None

    @staticmethod
    def _check(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
        if tuple(got) != tuple(want):
            raise WeightError(f"checkpoint tensor {name} has shape {tuple(got)}, the config implies {tuple(want)}")


class SafetensorsReader(Reader):
    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.files: dict[str, object] = {}
        self.where: dict[str, str] = {}
        for file in sorted(self.folder.glob("*.safetensors")):
            handle = safe_open(str(file), framework="pt")
            self.files[file.name] = handle
            for key in handle.keys():
                self.where[key] = file.name

    def has(self, name: str) -> bool:
        return name in self.where

    def _slice(self, name: str):
        if name not in self.where:
            raise WeightError(f"tensor {name} is missing from the checkpoint in {self.folder}")
        return self.files[self.where[name]].get_slice(name)

    def fp8_scale_shape(self, name: str) -> tuple[int, ...] | None:
        if f"{name}.weight" not in self.where or self._slice(f"{name}.weight").get_dtype() != "F8_E4M3":
            return None
        if f"{name}.weight_scale" not in self.where:
            raise WeightError(f"{name}.weight is stored in FP8 (e4m3) but the checkpoint in {self.folder} has no "
                              f"{name}.weight_scale to go with it")
        return tuple(self._slice(f"{name}.weight_scale").get_shape())

    def read(self, name, shape, dim, start, end, device, dtype):
        sl = self._slice(name)
        self._check(name, tuple(sl.get_shape()), shape)
        if sl.get_dtype() == "F8_E4M3" and dtype != torch.float8_e4m3fn:
            raise WeightError(f"{name} is stored in FP8 (e4m3): load this checkpoint with quantization='fp8' "
                              f"(it is read with its scales)")
        if dim is None:
            t = sl[:]
        elif dim == 0:
            t = sl[start:end]
        else:
            t = sl[:, start:end]
        return t.to(device=device, dtype=dtype)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """Hugging Face tensor name -> llama.cpp GGUF tensor name."""
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>.weight|bias
    if parts[:2] != ["model", "layers"]:
        raise KeyError(hf_name)
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{_GGUF_LAYER[module]}.{parts[-1]}"


class GGUFReader(Reader):
    def __init__(self, path: str, config: ModelConfig):
        import gguf

        self._gguf = gguf
        self.path = path
        self.reader = gguf.GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.head_dim = config.head_dim
        # llama.cpp permutes q/k rows of llama-arch models for its rotary kernel; qwen2 is untouched
        self.unpermute = config.model_type == "llama"

    def has(self, name: str) -> bool:
        try:
            return gguf_name(name) in self.tensors
        except KeyError:
            return False

    def read(self, name, shape, dim, start, end, device, dtype):
        import numpy as np

        gname = gguf_name(name)
        if gname not in self.tensors:
            raise WeightError(f"tensor {gname} ({name}) is missing from {self.path}")
        t = self.tensors[gname]
        # GGUF lists dims innermost first; data is [rows, packed bytes] for quantized types
        full = tuple(int(x) for x in reversed(t.shape.tolist()))
        self._check(name, full, shape)
        data = t.data
        if dim == 0 and len(full) == 2:
            data = data[start:end]
        arr = self._gguf.quants.dequantize(np.asarray(data), t.tensor_type)
        arr = arr.reshape(-1, full[1]) if len(full) == 2 else arr.reshape(full)
        if dim == 1:
            arr = arr[:, start:end]
        elif dim == 0 and len(full) == 1:
            arr = arr[start:end]
        out = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
        if self.unpermute and (name.endswith("q_proj.weight") or name.endswith("k_proj.weight")):
            out = self._unpermute_rows(out, name, start if dim == 0 else 0)
        return out.to(device=device, dtype=dtype)

    def _unpermute_rows(self, w: torch.Tensor, name: str, start: int) -> torch.Tensor:
        # within each head llama.cpp stores rotary pairs interleaved (x0, x_{d/2}, x1, ...);
        # Hugging Face keeps halves (x0..x_{d/2-1}, x_{d/2}..). Undo per head, so slices must be head-aligned.
        d = self.head_dim
        if start % d or w.shape[0] % d:
            raise WeightError(f"slice of {name} is not aligned to head_dim={d}")
        n = w.shape[0] // d
        return w.reshape(n, d // 2, 2, -1).transpose(1, 2).reshape(w.shape)


class RandomReader(Reader):
    """Random weights made on the device: N(0, 0.02) for matrices, 1 for norms, 0.02-scaled biases. Each
    tensor is drawn whole from a generator seeded by (seed, name) and the rank keeps its slice, so every
    layout (TP, PP, EP) of a random preset is the same model on the same kind of device."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def has(self, name: str) -> bool:
        return True

    def read(self, name, shape, dim, start, end, device, dtype):
        if name.endswith("norm.weight"):
            size = list(shape)
            if dim is not None:
                size[dim] = end - start
            return torch.ones(size, device=device, dtype=dtype)
        digest = hashlib.sha1(f"{self.seed}:{name}".encode()).digest()
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        whole = torch.empty(list(shape), device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
        return whole if dim is None else whole.narrow(dim, start, end - start)


def open_reader(kind: str, path: str | None, config: ModelConfig, seed: int = 0) -> Reader:
    if kind == "hf":
        return SafetensorsReader(path)
    if kind == "gguf":
        return GGUFReader(path, config)
    if kind == "random":
        return RandomReader(seed)
    raise ValueError(f"unknown weight source {kind!r}")

