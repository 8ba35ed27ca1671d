import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Every tiny HF model, saved once per session: name -> (folder, HF model)."""
    from hf_models import TINY, make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {name: (root / name, make_tiny(name, root / name)) for name in TINY}


@pytest.fixture(scope="session")
def hf_refs(tiny_models):
    """name -> Hugging Face's greedy tokens and logits for each of hf_models.PROMPTS, made on first use."""
    from hf_models import PROMPTS, STEPS, hf_greedy

    class Refs(dict):
        def __missing__(self, name):
            self[name] = [hf_greedy(tiny_models[name][1], p, STEPS) for p in PROMPTS]
            return self[name]

    return Refs()


def worker_pids() -> set[int]:
    """PIDs of shardlm worker processes still alive on this machine."""
    out = subprocess.run(["pgrep", "-f", "shardlm.worker.main"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}
