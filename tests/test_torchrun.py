"""Workers started by torchrun (as on several nodes) instead of by the driver."""

import os
import secrets
import socket
import subprocess
import sys

from shardlm import LLM, SamplingParams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_token(monkeypatch) -> str:
    """The token both sides know: the workers start before the driver could print one."""
    token = secrets.token_hex(16)
    monkeypatch.setenv("SHARDLM_DRIVER_TOKEN", token)
    return token


def test_external_workers_from_torchrun(monkeypatch):
    port = _free_port()
    env = dict(os.environ, SHARDLM_DRIVER=f"127.0.0.1:{port}", SHARDLM_DRIVER_TOKEN=_shared_token(monkeypatch))
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


def test_pipeline_stages_on_two_torchrun_nodes(monkeypatch):
    """TP=2 inside each of two 'nodes' (two torchrun agents with node ranks 0 and 1), PP=2 between them:
    the layout the planner recommends across nodes; tokens equal the spawned run's."""
    port, master = _free_port(), _free_port()
    env = dict(os.environ, SHARDLM_DRIVER=f"127.0.0.1:{port}", SHARDLM_DRIVER_TOKEN=_shared_token(monkeypatch))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
                               "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(master),
                               "-m", "shardlm.worker.main"], env=env) for n in (0, 1)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10]]
    try:
        with LLM("random:tiny-llama", tensor_parallel_size=2, pipeline_parallel_size=2, external_workers=True,
                 driver_port=port) as llm:
            out = llm.generate(prompts, params)
        with LLM("random:tiny-llama", tensor_parallel_size=2, pipeline_parallel_size=2) as spawned:
            ref = spawned.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
        assert all(node.wait(timeout=30) == 0 for node in nodes)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
