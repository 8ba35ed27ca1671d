"""EngineArgs: the command line built from its fields, and validate() before any model or GPU is touched."""

import argparse
from dataclasses import fields
from typing import get_args

import pytest

from shardlm.common.config import ConfigError
from shardlm.common.layout import LayoutError
from shardlm.engine.arg_utils import EngineArgs, ExpertPlacement
from shardlm.engine.moe_placement import PLACEMENTS
from shardlm.entrypoints.cli import build_parser


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def engine_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    return parser


def test_every_field_is_a_flag_with_help():
    actions = engine_parser()._option_string_actions
    for f in fields(EngineArgs):
        action = actions[flag(f.name)]
        assert action.dest == f.name and action.help.strip(), f.name
    assert actions["-tp"].dest == "tensor_parallel_size" and actions["-pp"].dest == "pipeline_parallel_size"
    assert actions["--no-enable-prefix-caching"].dest == "enable_prefix_caching"
    # generate, bench latency and serve all take every engine flag
    for argv in (["generate", "hi"], ["bench", "latency"], ["serve"]):
        args = vars(build_parser().parse_args(argv))
        assert all(f.name in args for f in fields(EngineArgs)), argv


@pytest.mark.parametrize("command", [["generate"], ["bench", "latency"], ["serve"]])
def test_help_shows_the_dataclass_defaults(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in fields(EngineArgs):
        if f.default is not None and f.default is not False:
            shown = "on" if f.default is True else f.default
            assert f"(default: {shown})" in out, f.name
    assert "--max-seq-len-to-capture N" in out
    assert "--attention-backend {auto,triton,torch}" in out
    assert "{auto,float32,bfloat16,float16}" in out and "{round_robin,balanced}" in out


def test_flags_not_given_keep_the_dataclass_defaults():
    assert EngineArgs.from_cli_args(engine_parser().parse_args([])) == EngineArgs()
    args = build_parser().parse_args(["generate", "hi"])
    assert args.tensor_parallel_size is None  # --parallel auto tells "not given" apart
    assert EngineArgs.from_cli_args(args) == EngineArgs()


def test_from_cli_args_round_trip():
    argv = ["--model", "random:tiny-llama", "-tp", "2", "-pp", "2", "--pp-layer-split", "1,1", "--dtype", "float16",
            "--device", "cpu", "--max-model-len", "128", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
            "--block-size", "8", "--gpu-memory-utilization", "0.5", "--kv-cache-memory-bytes", "1048576",
            "--enforce-eager", "--max-seq-len-to-capture", "1024", "--no-enable-prefix-caching",
            "--enable-expert-parallel", "--expert-placement", "balanced", "--expert-load", "load.json",
            "--num-redundant-experts", "2", "--external-workers", "--driver-host", "0.0.0.0", "--driver-port", "29600",
            "--first-device", "4", "--max-batches-in-flight", "1", "--seed", "3", "--trace", "t.json"]
    assert EngineArgs.from_cli_args(engine_parser().parse_args(argv)) == EngineArgs(
        model="random:tiny-llama", tensor_parallel_size=2, pipeline_parallel_size=2, pp_layer_split=[1, 1],
        dtype="float16", device="cpu", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=512, block_size=8,
        gpu_memory_utilization=0.5, kv_cache_memory_bytes=1 << 20, enforce_eager=True, max_seq_len_to_capture=1024,
        enable_prefix_caching=False, enable_expert_parallel=True, expert_placement="balanced",
        expert_load="load.json", num_redundant_experts=2, external_workers=True, driver_host="0.0.0.0",
        driver_port=29600, first_device=4, max_batches_in_flight=1, seed=3, trace="t.json")
    # serve's budget and KV flags come from EngineArgs now
    args = build_parser().parse_args(["serve", "random:tiny-llama", "--max-num-batched-tokens", "512",
                                      "--kv-cache-memory-bytes", "4096", "--port", "9000"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.max_num_batched_tokens, engine_args.kv_cache_memory_bytes, args.port) == (512, 4096, 9000)


@pytest.mark.parametrize("argv, needle", [
    (["--pp-layer-split", "10,x"], "argument --pp-layer-split: must be comma-separated integers"),
    (["--max-num-seqs", "many"], "argument --max-num-seqs: invalid int value"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
])
def test_bad_flag_values_name_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", *argv, "hi"])
    assert needle in capsys.readouterr().err


def test_defaults_and_full_settings_are_valid(tmp_path):
    EngineArgs().validate()
    EngineArgs(tensor_parallel_size=2, pipeline_parallel_size=2, pp_layer_split=[3, 5], enable_expert_parallel=True,
               expert_placement="balanced", expert_load="load.json", num_redundant_experts=1,
               trace=tmp_path / "t.json", model=tmp_path, kv_cache_memory_bytes=1, gpu_memory_utilization=1).validate()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(tensor_parallel_size="2"), LayoutError, "tensor_parallel_size must be an integer, got '2'"),
    (dict(tensor_parallel_size=0), LayoutError, "tensor_parallel_size must be a positive integer, got 0"),
    (dict(pipeline_parallel_size=-1), LayoutError, "pipeline_parallel_size must be a positive integer, got -1"),
    (dict(pp_layer_split="10,14"), LayoutError, "pp_layer_split must be a list of integers or None"),
    (dict(pipeline_parallel_size=2, pp_layer_split=[1, 2.5]), LayoutError, "pp_layer_split must be a list of integers"),
    (dict(pipeline_parallel_size=2, pp_layer_split=[4]), LayoutError, "names 1 stages, pipeline_parallel_size is 2"),
    (dict(pipeline_parallel_size=2, pp_layer_split=[4, 0]), LayoutError, "every entry must be >= 1"),
    (dict(max_num_seqs="8"), ConfigError, "max_num_seqs must be an integer, got '8'"),
    (dict(max_num_seqs=0), ConfigError, "max_num_seqs must be >= 1, got 0"),
    (dict(block_size=0), ConfigError, "block_size must be >= 1, got 0"),
    (dict(max_num_batched_tokens=0), ConfigError, "max_num_batched_tokens must be >= 1, got 0"),
    (dict(max_num_batched_tokens=32769), ConfigError, "max_num_batched_tokens must be <= 32768"),
    (dict(max_batches_in_flight=0), ConfigError, "max_batches_in_flight must be >= 1, got 0"),
    (dict(max_seq_len_to_capture=0), ConfigError, "max_seq_len_to_capture must be >= 1, got 0"),
    (dict(max_model_len=0), ConfigError, "max_model_len must be >= 1, got 0"),
    (dict(max_model_len="4k"), ConfigError, "max_model_len must be an integer or None, got '4k'"),
    (dict(kv_cache_memory_bytes=0), ConfigError, "kv_cache_memory_bytes must be >= 1, got 0"),
    (dict(gpu_memory_utilization=0), ConfigError, "gpu_memory_utilization must be in (0, 1], got 0"),
    (dict(gpu_memory_utilization=1.5), ConfigError, "gpu_memory_utilization must be in (0, 1], got 1.5"),
    (dict(gpu_memory_utilization="0.5"), ConfigError, "gpu_memory_utilization must be a number, got '0.5'"),
    (dict(device="tpu"), ConfigError, "device must be one of auto, cuda, cpu, got 'tpu'"),
    (dict(dtype="fp8"), ConfigError, "dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"),
    (dict(enforce_eager="no"), ConfigError, "enforce_eager must be True or False, got 'no'"),
    (dict(model=7), ConfigError, "model must be a string, a path, a ModelSource or None, got 7"),
    (dict(first_device=-1), ConfigError, "first_device must be >= 0, got -1"),
    (dict(driver_port=70000), ConfigError, "driver_port must be in 0..65535"),
    (dict(num_redundant_experts=-1), ConfigError, "num_redundant_experts must be >= 0, got -1"),
    (dict(expert_placement="hot-first"), ConfigError, "expert_placement must be one of round_robin, balanced"),
    (dict(expert_placement="balanced", expert_load="l.json"), ConfigError, "add enable_expert_parallel"),
    (dict(enable_expert_parallel=True, num_redundant_experts=1, expert_placement="balanced", expert_load="l.json"),
     ConfigError, "add enable_expert_parallel with tensor_parallel_size > 1"),
    (dict(tensor_parallel_size=2, enable_expert_parallel=True, expert_load="l.json"), ConfigError,
     "need expert_placement='balanced'"),
    (dict(tensor_parallel_size=2, enable_expert_parallel=True, expert_placement="balanced"), ConfigError,
     "balanced' needs a measured load"),
])
def test_validate_names_the_setting(kwargs, error, message):
    with pytest.raises(error) as info:
        EngineArgs(**kwargs).validate()
    assert message in str(info.value)


def test_validate_checks_the_trace_path(tmp_path):
    with pytest.raises(ConfigError, match="trace .*folder .* does not exist; create it"):
        EngineArgs(trace=str(tmp_path / "no" / "t.json")).validate()
    with pytest.raises(ConfigError, match="is a folder; name a file"):
        EngineArgs(trace=tmp_path).validate()


def test_expert_placement_choices_match_the_placement_module():
    assert get_args(ExpertPlacement) == PLACEMENTS


def test_bench_profile_is_a_deprecated_alias_of_profile_step(capsys):
    assert build_parser().parse_args(["bench", "latency", "--profile-step"]).profile_step is True
    assert "deprecated" not in capsys.readouterr().err
    assert build_parser().parse_args(["bench", "latency"]).profile_step is False
    assert build_parser().parse_args(["bench", "latency", "--profile"]).profile_step is True
    err = capsys.readouterr().err
    assert "--profile is deprecated; use --profile-step" in err and len(err.strip().splitlines()) == 1
