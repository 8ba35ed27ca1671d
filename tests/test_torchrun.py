"""Workers started by torchrun (as on several nodes) instead of by the driver."""

import os
import socket
import subprocess
import sys

from shardlm import LLM, SamplingParams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_external_workers_from_torchrun():
    port = _free_port()
    env = dict(os.environ, SHARDLM_DRIVER=f"127.0.0.1:{port}")
    workers = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                "--master-port", str(_free_port()), "-m", "shardlm.worker.main"], env=env)
    try:
        with LLM("random:tiny-llama", tensor_parallel_size=2, external_workers=True, driver_port=port) as llm:
            out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        with LLM("random:tiny-llama", tensor_parallel_size=2) as spawned:
            ref = spawned.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        assert out[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
        assert workers.wait(timeout=30) == 0
    finally:
        if workers.poll() is None:
            workers.kill()
