"""The command line as a user runs it."""

import subprocess
import sys

import pytest


def shardlm(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardlm.entrypoints.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_streams_on_two_workers():
    res = shardlm("generate", "--model", "random:tiny-llama", "--tensor-parallel-size", "2", "--max-tokens", "12",
                  "--ignore-eos", "hello there")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()  # random weights: some text, possibly <|id|> tokens


def test_generate_tp_x_pp_with_trace(tmp_path):
    import json

    trace = tmp_path / "t.json"
    res = shardlm("generate", "--model", "random:tiny-llama", "--pipeline-parallel-size", "2",
                  "--tensor-parallel-size", "2", "--max-tokens", "6", "--ignore-eos", "--trace", str(trace), "hi")
    assert res.returncode == 0, res.stderr
    assert {e["pid"] for e in json.loads(trace.read_text())["traceEvents"]} == {0, 1, 2, 3}
    res = shardlm("generate", "--model", "random:tiny-llama", "-pp", "2", "--pp-layer-split", "1,2", "hi")
    assert res.returncode == 2 and "sums to 3, the model has 2 layers" in res.stderr
    res = shardlm("generate", "--model", "random:tiny-llama", "-pp", "2", "--max-batches-in-flight", "0", "hi")
    assert res.returncode == 2 and "max_batches_in_flight must be >= 1, got 0" in res.stderr


def test_generate_default_model_with_chat_template():
    res = shardlm("generate", "--max-tokens", "12", "What is 2+2?", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "4" in res.stdout


def test_errors_are_one_line_not_tracebacks():
    for args, needle in [(["--model", "nope"], "not found"),
                         (["--model", "random:tiny-llama", "-tp", "7"], "exceeds num_attention_heads"),
                         (["--model", "random:tiny-llama", "--top-p", "0"], "top_p must be a number in (0, 1]")]:
        res = shardlm("generate", *args, "hi")
        assert res.returncode == 2
        assert needle in res.stderr and "Traceback" not in res.stderr


def test_bench_latency_writes_json(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    res = shardlm("bench", "latency", "--model", "random:tiny-llama", "-tp", "2", "--batch-sizes", "1,3",
                  "--input-len", "8", "--output-len", "4", "--repeats", "3", "--json", str(out), "--plot", str(png))
    assert res.returncode == 0, res.stderr
    import json
    import statistics

    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]] == [1, 3]
    assert all(r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"] for r in data["results"])
    for r in data["results"]:  # three rounds, the median reported
        assert r["repeats"] == 3 and r["tpot_ms"] == statistics.median(r["tpot_ms_by_round"])
    res = shardlm("bench", "latency", "--model", "random:tiny-llama", "--repeats", "0")
    assert res.returncode == 2 and "--repeats must be >= 1" in res.stderr and "Traceback" not in res.stderr
    assert all(set(r["idle_fraction_by_rank"]) == {"0", "1"} for r in data["results"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parallel_auto_asks_the_planner(monkeypatch):
    """On a (pretended) 4 x H100 host, Llama-3-70B only fits at TP=4; the 8B model may use fewer GPUs."""
    import shardlm.engine.llm_engine as engine
    import shardlm.planner.auto as auto
    from shardlm.entrypoints.cli import _engine_args, build_parser

    monkeypatch.setattr(engine, "visible_gpus", lambda: 4)  # device auto then resolves to cuda
    monkeypatch.setattr(auto, "local_gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    args = build_parser().parse_args(["generate", "--parallel", "auto", "--model", "random:llama-3-70b",
                                      "--max-model-len", "4096", "hi"])
    assert _engine_args(args).tensor_parallel_size == 4
    args = build_parser().parse_args(["generate", "--parallel", "auto", "--model", "random:llama-3-8b", "hi"])
    assert _engine_args(args).tensor_parallel_size in (1, 2, 4)
    args = build_parser().parse_args(["generate", "--parallel", "auto", "-tp", "1", "hi"])
    with pytest.raises(ValueError, match="--parallel auto chooses --tensor-parallel-size itself"):
        _engine_args(args)


def test_every_option_with_a_default_says_it_in_help():
    """`--help` of every (sub)command names each option's default (a new user reads them there)"""
    import argparse

    from shardlm.entrypoints.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, child in action.choices.items():
                    walk(child, f"{name} {sub_name}")
            elif (action.option_strings and action.help != argparse.SUPPRESS and action.default is not None
                  and action.default is not False and action.default != argparse.SUPPRESS):
                shown = parser._get_formatter()._expand_help(action) if action.help else ""  # no help: no line
                if "default" not in shown:
                    missing.append(f"{name} {action.option_strings[0]}")
        assert "usage" in text

    walk(build_parser(), "shardlm")
    assert not missing, missing


def test_bench_profile_step_on_the_cpu_is_quiet_and_says_where_host_time_goes(capfd):
    """no profiler chatter (kineto's USDT lines from the workers) and no all-zero GPU table on the CPU"""
    from shardlm.entrypoints.cli import main

    assert main(["bench", "latency", "--model", "random:tiny-llama", "--device", "cpu", "--batch-sizes", "1",
                 "--input-len", "8", "--output-len", "8", "--profile-step"]) == 0
    out, err = capfd.readouterr()
    assert "USDT" not in out + err and "GPU time" not in out
    assert "decode step on the CPU by rank: rank 0:" in out and "aten::" in out


def test_bench_profile_step_needs_enough_steps(capsys):
    from shardlm.entrypoints.cli import main

    assert main(["bench", "latency", "--model", "random:tiny-llama", "--device", "cpu", "--output-len", "4",
                 "--profile-step"]) == 2
    assert "--output-len >= 7" in capsys.readouterr().err


def test_the_cli_runs_without_the_server_packages():
    """generate / bench / plan work where fastapi is not installed (the GPU hosts): only serve needs it"""
    import subprocess
    import sys

    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "from shardlm.entrypoints.cli import build_parser; build_parser().parse_args(['bench', 'latency'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
