import os
import subprocess
import sys
import time
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


# every process this test run starts inherits this mark, so worker_pids() sees only this run's workers
# (other shardlm runs on the same machine have their own), even once a worker's parent is gone
RUN_MARK = f"PYTEST_SHARDLM_RUN={os.getpid()}-{time.time_ns()}"
os.environ["PYTEST_SHARDLM_RUN"] = RUN_MARK.split("=", 1)[1]


def worker_pids() -> set[int]:
    """PIDs of this test run's shardlm worker processes still alive."""
    out = subprocess.run(["pgrep", "-f", "shardlm.worker.main"], capture_output=True, text=True).stdout
    pids = set()
    for pid in map(int, out.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if RUN_MARK.encode() in environ:
            pids.add(pid)
    return pids
