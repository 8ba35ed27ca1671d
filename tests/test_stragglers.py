"""The start-up straggler check (engine/stragglers.py): the arithmetic on given rates, and a worker group
with one rank slowed on purpose (SHARDLM_SLOW_RANK) named in the log, the trace and /metrics."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from shardlm.common import envs
from shardlm.engine.stragglers import check_ranks


def rates(*gbps):
    return {r: (g, r, "NVIDIA H200", f"00000000:{0x19 + r:02x}:00.0") for r, g in enumerate(gbps)}


def test_the_slow_gpu_of_the_two_gpu_host_is_named():
    """the 2 x H200 host of issue 17: a GEMV at 3,845 GB/s on GPU 0 and 1,610 GB/s on GPU 1"""
    checks = check_ranks(rates(3845, 1610))
    assert [c.straggler for c in checks] == [False, True]
    assert checks[1].slowdown == pytest.approx(3845 / 1610)
    assert checks[1].where() == "rank 1 (GPU 1, NVIDIA H200, bus 00000000:1a:00.0)"


@pytest.mark.parametrize("slow, named", [(1.25, True), (1.21, True), (1.19, False), (1.0, False)])
def test_more_than_20_percent_slower_than_the_median_of_the_others(slow, named):
    """the threshold is on time against the other ranks' median (a slow rank does not pull its own
    reference down): with 2 ranks a 25% slower one is named"""
    for n in (2, 4, 8):
        checks = check_ranks(rates(*([4000.0] * (n - 1) + [4000.0 / slow])))
        assert [c.straggler for c in checks] == [False] * (n - 1) + [named], (n, slow)


def test_cpu_ranks_are_named_only_when_far_slower():
    """CPU ranks share the host's cores: a loaded host makes one 1.3-1.6x slower with nothing wrong (seen on
    the 2-core CI machine during the test suite), so a CPU rank is named past 3x"""
    cpu = lambda *gbps: {r: (g, None, "cpu", "") for r, g in enumerate(gbps)}  # noqa: E731
    assert [c.straggler for c in check_ranks(cpu(79, 50))] == [False, False]
    assert [c.straggler for c in check_ranks(cpu(79, 25))] == [False, True]
    assert check_ranks(cpu(79, 25))[1].where() == "rank 1 (cpu)"


def test_one_rank_or_a_slow_majority():
    assert not check_ranks(rates(100.0))[0].straggler  # no peers: nothing to compare
    assert check_ranks(rates(100.0))[0].slowdown == 1.0
    # half the GPUs slow: each slow rank's peers' median is the middle of fast and slow
    checks = check_ranks(rates(4000, 4000, 2000, 2000))
    assert [c.straggler for c in checks] == [False, False, True, True]


@pytest.mark.parametrize("raw", ["1", "x:2", "1:0", "-1:2", "1:2:3"])
def test_slow_rank_testing_aid_rejects_bad_values(monkeypatch, raw):
    monkeypatch.setenv("SHARDLM_SLOW_RANK", raw)
    with pytest.raises(ValueError, match="SHARDLM_SLOW_RANK"):
        envs.slowdown(0)


def test_a_rank_slowed_on_purpose_is_reported(monkeypatch, caplog, tmp_path):
    """TP=2 on the CPU, rank 1's start-up GEMV made 8x as long: the engine names it (log warning with its
    rate against the other's), the Perfetto trace's track says STRAGGLER, /metrics exports both ranks."""
    from shardlm.engine.arg_utils import EngineArgs
    from shardlm.engine.llm_engine import LLMEngine
    from shardlm.server.metrics import Metrics

    monkeypatch.setenv("SHARDLM_SLOW_RANK", "1:8")
    trace = tmp_path / "trace.json"
    with caplog.at_level(logging.WARNING, logger="shardlm.engine"):
        engine = LLMEngine(EngineArgs(model="random:tiny-llama", tensor_parallel_size=2, device="cpu",
                                      trace=str(trace)))
    try:
        checks = engine.rank_checks
        assert [c.rank for c in checks] == [0, 1] and all(c.gemv_gbps > 0 for c in checks)
        # 8x the work; the two ranks share this machine's memory, and rank 0 is done first: less than 8x
        assert checks[1].straggler and checks[1].slowdown > 3, checks
        assert not checks[0].straggler
        warned = [r.getMessage() for r in caplog.records if "straggler" in r.getMessage()]
        assert len(warned) == 1 and warned[0].startswith("shardlm: rank 1 (cpu) is a straggler"), warned
        m = Metrics("m")
        m.on_workers(SimpleNamespace(index=0, engine=engine))
        text = m.render().decode()
        assert 'shardlm:rank_straggler{model_name="m",rank="1",replica="0"} 1.0' in text
        assert 'shardlm:rank_straggler{model_name="m",rank="0",replica="0"} 0.0' in text
        assert text.count("shardlm:rank_gemv_gbps{") == 2
    finally:
        with caplog.at_level(logging.INFO, logger="shardlm.engine"):
            engine.shutdown()
    assert any(r.getMessage().startswith(f"shardlm: trace written to {trace}") for r in caplog.records)
    data = json.loads(trace.read_text())
    names = {e["pid"]: e["args"]["name"] for e in data["traceEvents"] if e["name"] == "process_name"}
    assert "STRAGGLER" in names[1] and "STRAGGLER" not in names[0], names
    assert data["otherData"]["stragglers"] == [1]


def test_slowest_rank_of_a_profiled_step():
    """issue 17's 70B step at TP=2: rank 1's GEMMs 41.8 ms, rank 0's 16.5 ms (rank 0 waits in all-reduces:
    communication, left out)"""
    from shardlm.engine.stragglers import slowest_rank

    prof = {0: {"gemm_us": 16500.0, "attention_us": 300.0, "other_us": 700.0, "communication_us": 25000.0},
            1: {"gemm_us": 41800.0, "attention_us": 300.0, "other_us": 700.0, "communication_us": 500.0}}
    s = slowest_rank(prof)
    assert s["rank"] == 1 and s["ratio"] == pytest.approx(42800 / 17500)
    assert slowest_rank({0: prof[0]}) is None
    assert slowest_rank({r: dict.fromkeys(prof[0], 0.0) for r in (0, 1)}) is None  # CPU: no kernel times


def test_kernels_where_a_rank_waits_for_the_others_count_as_communication():
    """a slow peer shows up as a long all-reduce on the other ranks: NCCL's kernels and the peer-memory ones
    (with or without the fused add + norm) are communication, left out of the slowest rank's arithmetic"""
    from shardlm.worker.profiling import _kernel_kind

    for name in ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
                 "_all_reduce_kernel", "_all_reduce_add_norm_kernel"):
        assert _kernel_kind(name) == "communication", name
    assert _kernel_kind("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "send_recv"
    assert _kernel_kind("_add_rms_norm_kernel") == "other"  # the plain add + norm (TP=1, or NCCL's path)
    assert _kernel_kind("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT") == "gemm"
    assert _kernel_kind("_attention_kernel") == "attention"
