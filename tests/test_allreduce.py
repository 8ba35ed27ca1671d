"""The TP all-reduce's dispatch (kernels/allreduce.py, worker/distributed.py) on the CPU: which path a
message takes, the limits the probe measures and saves, why a group stays on NCCL, and the engine's
start-up line. The peer-memory kernels themselves run in tests/test_gpu.py (two GPUs)."""

from __future__ import annotations

import pytest

from shardlm.worker.distributed import peer_problem
from shardlm.worker.kernels.allreduce import (
    NCCL,
    ONE_SHOT,
    TWO_SHOT,
    AllReduceLimits,
    default_limits,
    limits_file,
    load_limits,
    measured_limits,
    save_limits,
)


def test_path_by_message_size():
    lim = AllReduceLimits(256 << 10, 1 << 20)
    assert [lim.path(b) for b in (2, 16 << 10, 256 << 10, (256 << 10) + 2, 1 << 20, (1 << 20) + 2)] == [
        ONE_SHOT, ONE_SHOT, ONE_SHOT, TWO_SHOT, TWO_SHOT, NCCL]
    assert lim.max_bytes == 1 << 20
    assert AllReduceLimits(0, 0).path(2) == NCCL  # the probe found NCCL faster everywhere


def test_defaults_per_group_size():
    """two GPUs: never two-shot (it moves as many bytes over NVLink as one-shot); larger groups the 4-GPU row"""
    two, four, eight = default_limits(2), default_limits(4), default_limits(8)
    assert two.path(1 << 20) == ONE_SHOT and two.two_shot_max == two.one_shot_max
    assert four.path(512 << 10) == TWO_SHOT and eight == four and default_limits(3) == two


def test_measured_limits_from_a_sweep():
    sizes = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
    sweep = {NCCL: [[b, us] for b, us in zip(sizes, [15, 17, 22, 40, 90])],
             ONE_SHOT: [[b, us] for b, us in zip(sizes, [5, 7, 20, 60, 200])],
             TWO_SHOT: [[b, us] for b, us in zip(sizes, [7, 8, 16, 35, 120])]}
    lim = measured_limits(sweep)
    # one-shot leads up to 64 KiB; two-shot then beats it and NCCL up to 1 MiB; NCCL wins at 4 MiB
    assert (lim.one_shot_max, lim.two_shot_max) == (64 << 10, 1 << 20)
    del sweep[TWO_SHOT]  # two GPUs: one-shot against NCCL only
    assert (measured_limits(sweep).one_shot_max, measured_limits(sweep).two_shot_max) == (256 << 10, 256 << 10)
    sweep[ONE_SHOT][0][1] = 99  # NCCL faster at the smallest size: no custom path at all
    assert measured_limits(sweep).max_bytes == 0


def test_saved_limits_are_read_back_per_gpu_and_group_size(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDLM_CACHE", str(tmp_path))
    assert load_limits("NVIDIA H200", 2) == default_limits(2)
    path = save_limits("NVIDIA H200", 2, AllReduceLimits(128 << 10, 128 << 10))
    assert path == limits_file("NVIDIA H200", 2) == tmp_path / "allreduce" / "nvidia-h200-tp2.json"
    got = load_limits("NVIDIA H200", 2)
    assert (got.one_shot_max, got.two_shot_max) == (128 << 10, 128 << 10) and "shardlm probe" in got.source
    assert load_limits("NVIDIA H200", 4) == default_limits(4)  # another group size: not measured
    path.write_text("{not json")
    bad = load_limits("NVIDIA H200", 2)
    assert bad.max_bytes == default_limits(2).max_bytes and "unreadable" in bad.source


@pytest.mark.parametrize("custom, peers, access, triton_ok, want", [
    (True, [("a", 0), ("a", 1)], True, True, None),
    (False, [("a", 0), ("a", 1)], True, True, "--disable-custom-all-reduce"),
    (True, [("a", 0), ("b", 0)], True, True, "the group spans hosts"),
    (True, [("a", 0), ("a", 1)], True, False, "triton is not installed"),
    (True, [("a", 0), ("a", 1)], False, True, "GPU 0 cannot access GPU 1's memory (no peer-to-peer path)"),
])
def test_why_a_group_stays_on_nccl(custom, peers, access, triton_ok, want):
    assert peer_problem(custom, 0, peers, lambda a, b: access, triton_ok) == want


def test_engine_says_which_all_reduce_it_runs(caplog):
    """CPU ranks sum with gloo; the start-up line says so; the flag parses with vLLM's name"""
    import argparse
    import logging

    from shardlm.engine.arg_utils import EngineArgs
    from shardlm.engine.llm_engine import LLMEngine

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args(["--disable-custom-all-reduce"])
    assert EngineArgs.from_cli_args(args).disable_custom_all_reduce
    with caplog.at_level(logging.INFO, logger="shardlm.engine"):
        engine = LLMEngine(EngineArgs(model="random:tiny-llama", tensor_parallel_size=2, device="cpu"))
    try:
        assert engine.all_reduce_path == "gloo (CPU)"
        assert any("tensor-parallel all-reduce: gloo (CPU)" in r.getMessage() for r in caplog.records)
    finally:
        engine.shutdown()
