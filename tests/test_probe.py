"""`shardlm probe` on CPU (gloo): a profile the planner accepts, with every measured part present."""

import json
import subprocess
import sys

from shardlm.planner import load_profile


def test_probe_writes_a_profile_the_planner_reads(tmp_path):
    out = tmp_path / "probe.json"
    res = subprocess.run([sys.executable, "-m", "shardlm.cli", "probe", "--out", str(out), "--device", "cpu",
                          "--max-group", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["topology"]["interconnect"] == "cpu" and "gpu_count" not in data
    for key in ("layer_floor_us", "step_overhead_us", "prefill_overhead_us", "eager_layer_floor_us"):
        assert set(data[key]) == {"1", "2"}, key
    assert all(v > 0 for v in data["layer_floor_us"].values())
    assert all(v > 0 for v in data["eager_layer_floor_us"].values())
    assert data["engine"] == {"cuda_graphs": False}  # no graphs on the CPU
    # a prefill step (128 prompt tokens) costs the host at least what a decode step does
    assert all(data["prefill_overhead_us"][k] >= data["step_overhead_us"][k] * 0.5 for k in ("1", "2"))
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
