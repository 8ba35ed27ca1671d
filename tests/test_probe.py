"""`shardlm probe` on CPU (gloo): a profile the planner accepts, with every measured part present."""

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from shardlm.common.config import ConfigError
from shardlm.common.layout import ParallelLayout
from shardlm.common.presets import PRESETS as ENGINE_PRESETS
from shardlm.entrypoints.cli import main
from shardlm.entrypoints.llm import LLM
from shardlm.entrypoints.probe import PROMPT_LEN, _host_times, _model_to_time
from shardlm.planner import load_model, load_profile, make_cluster
from shardlm.planner.cost import CostModel, stage_shards


def test_probe_writes_a_profile_the_planner_reads(tmp_path):
    out = tmp_path / "probe.json"
    res = subprocess.run([sys.executable, "-m", "shardlm.entrypoints.cli", "probe", "--out", str(out), "--device", "cpu",
                          "--max-group", "2", "--model", "random:smollm2-135m"], capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["topology"]["interconnect"] == "cpu" and "gpu_count" not in data and data["device"].startswith("cpu")
    # saved after each group size, whole files only
    assert f"saved groups ['1'] to {out}" in res.stderr and f"saved groups ['1', '2'] to {out}" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["probe.json"]
    for key in ("layer_floor_us", "step_overhead_us", "prefill_overhead_us", "eager_layer_floor_us",
                "step_overhead_per_seq_us"):
        assert set(data[key]) == {"1", "2"}, key
    assert all(v > 0 for v in data["layer_floor_us"].values())
    assert all(v > 0 for v in data["eager_layer_floor_us"].values())
    assert data["engine"] == {"cuda_graphs": False, "attention_backend": "torch"}  # no graphs, no kernels on the CPU
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
    # --model: SmolLM2-135M's own layers at 2 and 8 layers, at both TP sizes; the planner, for a model of
    # that shape (any depth), predicts the batch-1 decode step and the first token on the line through them
    timed = data["model_layers"]
    model = replace(load_model("smollm2-135m"), bytes_per_param=4)  # the CPU engine runs float32
    assert timed["shape"] == dict(model.layer_shape) and set(timed["times_ms"]) == {"1", "2"}
    for tp in (1, 2):
        points = timed["times_ms"][str(tp)]
        assert set(points) == {"2", "8"} and all(p["decode_step"] > 0 and p["ttft"] > 0 for p in points.values())
        cm = CostModel(model, make_cluster("h100-80gb", 2), prof, kv_bytes=4)
        lay = ParallelLayout(tp=tp)
        decode = prof.model_layers.decode[tp]
        predicted = cm.decode_step(lay, stage_shards(model, lay), 1, timed["decode_context"])[0] * 1e6
        line = decode.zero_layers_us + model.n_layers * decode.per_layer_us
        # the prediction is the line, unless a term the calibration cannot take below 0 clamps it longer: the
        # step overhead (the line's zero-layer time less the predicted embedding and LM head) or, at TP=2, a
        # layer's GPU work (its measured time less the predicted all-reduces): noisy CPU timings can do either
        assert predicted >= line * (1 - 1e-9)
        if tp == 1 and cm.calibrated(tp, prefill=False, graphed=False)[2] > 0:
            assert predicted == pytest.approx(line)
        if decode.zero_layers_us > 0 and decode.per_layer_us > 0:  # not clamped by a noisy pair: through both
            assert decode.zero_layers_us + 8 * decode.per_layer_us == pytest.approx(points["8"]["decode_step"] * 1e3)


def test_probe_rounds_find_nothing_in_the_prefix_cache():
    # the same prompt twice would be found cached and mostly not prefilled: a round's first-token time
    # would then time a few tokens, not PROMPT_LEN (each round of the probe takes its own seed)
    with LLM("random:tiny-llama", device="cpu", max_model_len=512) as llm:
        for seed in range(3):
            _host_times(llm, wide=False, seed=seed)
        assert llm.engine.stats().blocks.prefix_hits == 0
        _host_times(llm, wide=False, seed=0)
        assert llm.engine.stats().blocks.prefix_hits >= PROMPT_LEN - 16  # all but the last block's tokens


def test_probe_model_from_a_config_alone(tmp_path):
    config = ENGINE_PRESETS["tiny-qwen2"].to_dict()
    hf = {"model_type": "qwen2", "hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"],
          "num_hidden_layers": 2, "num_attention_heads": config["num_attention_heads"],
          "num_key_value_heads": config["num_key_value_heads"], "vocab_size": config["vocab_size"]}
    (tmp_path / "config.json").write_text(json.dumps(hf))  # a folder with no weights: only the shape is used
    spec, shape = _model_to_time(str(tmp_path), "cpu")
    assert spec.kind == "random" and spec.config.hidden_size == hf["hidden_size"]
    assert shape == {**dict(load_model(str(tmp_path / "config.json")).layer_shape), "bytes_per_param": 4}
    assert _model_to_time(str(tmp_path / "config.json"), "cuda")[1]["bytes_per_param"] == 2
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        _model_to_time(str(tmp_path), "cpu")
    (tmp_path / "config.json").write_text(json.dumps({**hf, "hidden_size": None}))
    with pytest.raises(ConfigError):
        _model_to_time(str(tmp_path), "cpu")


def test_probe_model_must_be_dense(tmp_path):
    res = subprocess.run([sys.executable, "-m", "shardlm.entrypoints.cli", "probe", "--out", str(tmp_path / "p.json"),
                          "--model", "random:tiny-mixtral"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "mixture-of-experts" in res.stderr and "drop --model" in res.stderr
    assert not (tmp_path / "p.json").exists()


def test_probe_rejects_bad_group_size(tmp_path):
    res = subprocess.run([sys.executable, "-m", "shardlm.entrypoints.cli", "probe", "--out", str(tmp_path / "p.json"),
                          "--max-group", "0"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--max-group must be >= 1" in res.stderr


def test_probe_cut_short_keeps_the_groups_it_finished(tmp_path, monkeypatch, capsys):
    import shardlm.entrypoints.probe as probe

    def depth_times(n, *args, **kwargs):
        if n == 2:
            raise RuntimeError("worker rank 1 died (simulated)")
        return real(n, *args, **kwargs)

    real, out = probe._depth_times, tmp_path / "probe.json"
    monkeypatch.setattr(probe, "_depth_times", depth_times)
    assert main(["probe", "--out", str(out), "--device", "cpu", "--max-group", "2"]) == 1
    assert "worker rank 1 died" in capsys.readouterr().err
    prof = load_profile(str(out))  # group 1's measurements, a profile the planner takes
    assert set(json.loads(out.read_text())["layer_floor_us"]) == {"1"} and prof.host_calibrated


def test_probe_out_folder_must_exist(tmp_path):
    res = subprocess.run([sys.executable, "-m", "shardlm.entrypoints.cli", "probe", "--out", str(tmp_path / "no" / "p.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "does not exist" in res.stderr and "probe: group" not in res.stderr


def test_a_layers_gemm_shapes_are_the_models_own():
    """worker/probe.py layer_gemm_shapes: [out, in] of qkv, o, gate_up and down of the first dense layer on
    this rank (what `probe --model` times on a GPU); none for an MoE stage. On the CPU the probe times none
    (Probe(model_kernels=True, graph_times=True) answers empty tables: no kernels, no decode graphs)"""
    import torch

    from shardlm.common.messages import Probe
    from shardlm.common.presets import preset
    from shardlm.worker.distributed import ParallelContext
    from shardlm.worker.models.llama import LlamaForCausalLM
    from shardlm.worker.probe import layer_gemm_shapes

    ctx = ParallelContext(ParallelLayout(), 0, torch.device("cpu"), None, (0, 2))
    cfg = preset("tiny-llama")
    q, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    model = LlamaForCausalLM(cfg, ctx, torch.float32, max_positions=64)
    h, f = cfg.hidden_size, cfg.intermediate_size
    assert layer_gemm_shapes(model) == [((q + 2 * kv) * d, h), (h, q * d), (2 * f, h), (h, f)]
    assert layer_gemm_shapes(LlamaForCausalLM(preset("tiny-mixtral"), ctx, torch.float32, max_positions=64)) == []
    with LLM("random:tiny-llama", device="cpu", max_model_len=128) as llm:
        got = llm.engine.executor.call(Probe([], 1, False, model_kernels=True, graph_times=True))[0]
    assert got["attention"] == {} and got["layer_gemms"] == {} and got["decode_graph_us"] == {}


def test_the_probe_feeds_fp8_gemms_e4m3_rows_where_the_engine_hands_them_over():
    """worker/probe.py layer_handed: qkv and gate_up get their input quantised by the norm before them, down by
    SiLU x up, o_proj never; where the TP all-reduce kernel carries the norm, qkv and gate_up quantise their
    own"""
    from types import SimpleNamespace

    import torch

    from shardlm.common.presets import preset
    from shardlm.worker.distributed import ParallelContext
    from shardlm.worker.probe import layer_handed

    cpu, cfg = torch.device("cpu"), preset("tiny-llama")
    runner = SimpleNamespace(ctx=ParallelContext(ParallelLayout(), 0, cpu, None, (0, 2)),
                             source=SimpleNamespace(config=cfg), dtype=torch.float32)
    assert layer_handed(runner, 8) == (True, False, True, True)
    seen = []

    def in_kernel(x):
        seen.append(tuple(x.shape))
        return True

    runner.ctx = SimpleNamespace(device=cpu, norm_in_all_reduce=in_kernel)
    assert layer_handed(runner, 8) == (False, False, False, True) and seen == [(8, cfg.hidden_size)]


def test_probe_serving_times_what_a_served_request_waits_beyond_the_engine(monkeypatch):
    """`probe --serving`: `shardlm serve` on the tiny model (its own process, CPU here), requests one at a time
    through bench serve's client: the client's TTFT less the engine's own, >= 0;
    without the web stack it says what to install and measures nothing"""
    import builtins

    from shardlm.entrypoints import probe

    said = []
    overhead = probe.serving_overhead_us("cpu", said.append)
    assert overhead is not None and 100 < overhead < 1e6, said  # (us: HTTP and streaming take a while)
    client, engine, logged = map(float, re.fullmatch(
        r"probe: a served request's first token: (\S+) ms at the client, (\S+) in the engine: (\S+) ms of "
        r"serving overhead", said[-1]).groups())
    assert logged == pytest.approx(overhead / 1e3, abs=0.05) and client - engine == pytest.approx(logged, abs=0.15)
    real_import = builtins.__import__

    def no_uvicorn(name, *args, **kw):
        if name == "uvicorn":
            raise ImportError("no uvicorn", name="uvicorn")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    said.clear()
    assert probe.serving_overhead_us("cpu", said.append) is None
    assert said == ["probe: serving overhead not measured: uvicorn is not installed (pip install fastapi uvicorn "
                    "httpx prometheus-client)"]
