"""`shardlm probe` on CPU (gloo): a profile the planner accepts, with every measured part present."""

import json
import subprocess
import sys

import pytest

from shardlm.planner import load_profile


def test_probe_writes_a_profile_the_planner_reads(tmp_path):
    out = tmp_path / "probe.json"
    res = subprocess.run([sys.executable, "-m", "shardlm.cli", "probe", "--out", str(out), "--device", "cpu",
                          "--max-group", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["topology"]["interconnect"] == "cpu" and "gpu_count" not in data
    for key in ("layer_floor_us", "step_overhead_us", "prefill_overhead_us", "eager_layer_floor_us",
                "step_overhead_per_seq_us"):
        assert set(data[key]) == {"1", "2"}, key
    assert all(v > 0 for v in data["layer_floor_us"].values())
    assert all(v > 0 for v in data["eager_layer_floor_us"].values())
    assert data["engine"] == {"cuda_graphs": False}  # no graphs on the CPU
    # a 128-token prefill layer (eager, CPU) costs more than a 1-token decode layer; checked on one
    # process only: at TP=2 gloo's all-reduce dominates both and its noise can swap them
    assert data["eager_layer_floor_us"]["1"] > data["layer_floor_us"]["1"]
    for k in ("1", "2"):
        # each line runs through its deeper point (unless a noisy shallow point clamped the intercept at 0)
        deep = data["depth_times_ms"][k]["48"]
        for overhead, floor, point in (("step_overhead_us", "layer_floor_us", "decode_step"),
                                       ("prefill_overhead_us", "eager_layer_floor_us", "ttft")):
            if data[overhead][k] > 0:
                assert data[overhead][k] + 48 * data[floor][k] == pytest.approx(deep[point] * 1e3)
        assert data["step_overhead_per_seq_us"][k] >= 0
    assert data["hbm_gbps"] > 0.1 and data["gemm_tflops"] > 1e-4
    sweep = data["allreduce"]["2"]
    assert [b for b, _ in sweep] == [16384, 262144, 1048576] and all(us > 0 for _, us in sweep)
    assert len(data["all_to_all"]["2"]) == 3 and len(data["send_recv"]) == 3
    prof = load_profile(str(out))  # the planner validates it without complaint
    assert prof.host_calibrated and prof.prefill_overhead.at(2) == data["prefill_overhead_us"]["2"]
    assert prof.eager_layer_floor.at(1) == data["eager_layer_floor_us"]["1"]


def test_probe_rejects_bad_group_size(tmp_path):
    res = subprocess.run([sys.executable, "-m", "shardlm.cli", "probe", "--out", str(tmp_path / "p.json"),
                          "--max-group", "0"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--max-group must be >= 1" in res.stderr
