"""Bad input gets a clear error naming what to change; failures never hang or leave processes behind."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import worker_pids

from shardlm import LLM, SamplingParams
from shardlm.common.config import ConfigError
from shardlm.common.layout import LayoutError
from shardlm.common.model_source import ModelNotFoundError
from shardlm.engine.executor import WorkerError
from shardlm.engine.sampling_params import SamplingError

TINY = "random:tiny-llama"


def test_unknown_model_lists_what_works():
    with pytest.raises(ModelNotFoundError, match="random:<preset>.*tiny-llama"):
        LLM("no-such-model")
    with pytest.raises(ModelNotFoundError, match="known: .*random:llama-3-8b"):
        LLM("random:llama-9")


def test_folder_problems(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        LLM(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors"):
        LLM(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="required field 'num_attention_heads' is missing"):
        LLM(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type='gpt2' is not supported"):
        LLM(str(tmp_path))


def test_degrees_that_cannot_work():
    with pytest.raises(LayoutError, match="tensor_parallel_size=5 exceeds num_attention_heads=4"):
        LLM(TINY, tensor_parallel_size=5)
    with pytest.raises(LayoutError, match="needs 64 CPU worker processes"):
        LLM(TINY, tensor_parallel_size=64)
    with pytest.raises(LayoutError, match="positive integer"):
        LLM(TINY, tensor_parallel_size=0)
    if not _has_gpu():
        with pytest.raises(ConfigError, match="no GPU is visible"):
            LLM(TINY, device="cuda")
    with pytest.raises(ConfigError, match="max_model_len=5000 must be in"):
        LLM(TINY, max_model_len=5000)
    with pytest.raises(ConfigError, match="max_seq_len_to_capture must be >= 1, got 0"):
        LLM(TINY, max_seq_len_to_capture=0)
    with pytest.raises(TypeError, match="unknown LLM argument"):
        LLM(TINY, tensor_paralel_size=2)


def test_output_files_are_checked_before_any_work(tmp_path, capsys):
    from shardlm.entrypoints.cli import main

    missing = str(tmp_path / "no" / "out.json")
    with pytest.raises(ConfigError, match="trace .*folder .* does not exist; create it"):
        LLM(TINY, trace=missing)
    cases = [(["bench", "latency", "--model", TINY, "--json", missing], "--json"),
             (["bench", "latency", "--model", TINY, "--plot", str(tmp_path)], "--plot .* is a folder; name a file"),
             (["bench", "serve", "--model", "m", "--json", missing], "--json"),
             (["generate", "--model", TINY, "--save-expert-load", missing, "hi"], "--save-expert-load"),
             (["probe", "--out", missing], "--out")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(f"error: {message}", err), (argv, err)
        assert "probe: group" not in err and "batch" not in err  # nothing ran first


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def llm():
    with LLM(TINY, tensor_parallel_size=2, max_model_len=32) as engine:
        yield engine


def test_bad_requests_lose_no_work(llm):
    ok = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError, match="40 tokens but max_model_len is 32"):
        llm.generate([ok, {"prompt_token_ids": list(range(3, 43))}], SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([{"prompt_token_ids": [5, 99999]}])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}])
    with pytest.raises(SamplingError, match="top_p"):
        llm.generate(["hi"], SamplingParams(top_p=2))
    assert not llm.engine.has_unfinished_requests()  # nothing half-queued
    out = llm.generate([ok], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_generation_stops_at_max_model_len(llm):
    out = llm.generate([{"prompt_token_ids": list(range(3, 30))}], SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 32 - 27
    assert out[0].outputs[0].finish_reason == "length"


def test_dead_worker_brings_the_run_down_fast_without_restarts():
    """With max_worker_restarts=0 a dead rank ends the run at once, naming it (tests/test_recovery.py: the
    default replaces the group instead)."""
    before = worker_pids()
    llm = LLM(TINY, tensor_parallel_size=2, max_worker_restarts=0)
    victim = llm.engine.executor.procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="worker rank 1 died"):
        llm.generate(["hello"], SamplingParams(max_tokens=8))
    assert time.monotonic() - t0 < 10
    assert all(p.poll() is not None for p in llm.engine.executor.procs)
    assert worker_pids() <= before


def test_clean_shutdown_leaves_no_process():
    before = worker_pids()
    with LLM(TINY, tensor_parallel_size=3) as llm:
        assert len(worker_pids() - before) == 3
        llm.generate(["hi"], SamplingParams(max_tokens=2))
    assert worker_pids() <= before


def test_failure_inside_a_worker_is_reported(tmp_path):
    """A checkpoint whose tensor shapes disagree with config.json fails in the workers, with their message."""
    import torch
    from safetensors.torch import save_file

    cfg = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": torch.zeros(100, 32)}, str(tmp_path / "model.safetensors"))
    before = worker_pids()
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"model.embed_tokens.weight has shape \(100, 32\), the config implies \(300, 32\)"):
        LLM(str(tmp_path), tensor_parallel_size=2)
    assert time.monotonic() - t0 < 30
    assert worker_pids() <= before


def test_ctrl_c_stops_everything():
    before = worker_pids()
    proc = subprocess.Popen([sys.executable, "-m", "shardlm.entrypoints.cli", "generate", "--model", TINY, "-tp", "2",
                             "--max-tokens", "100000", "--max-model-len", "1024", "--ignore-eos", "hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a test run started in the background by a shell ignores SIGINT, and so would
                            # this child: give it the default disposition, as a terminal's command has
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the first generated character: the workers are up and the generation (1,000 tokens) under way, however
    # slow this machine is today
    assert proc.stdout.read(1), proc.stderr.read()
    assert len(worker_pids() - before) >= 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    time.sleep(0.5)
    assert worker_pids() <= before


def test_closing_a_stream_aborts_the_request(llm):
    stream = llm.stream({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=20, ignore_eos=True))
    first = next(stream)
    assert not first.finished
    stream.close()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.stats().blocks.usage == 0.0


def test_a_model_too_big_for_this_machine_is_refused_before_loading(monkeypatch):
    """float32 Llama-3-8B on a 24 GiB host: refused at once, naming what it needs and what to change"""
    import shardlm.engine.llm_engine as llm_engine
    from shardlm.common.config import ConfigError
    from shardlm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(llm_engine, "available_host_bytes", lambda: 24 << 30)
    monkeypatch.setattr(llm_engine, "Executor", lambda *a, **k: pytest.fail("workers started"))
    with pytest.raises(ConfigError, match=r"needs ~3\d\.\d GiB .* but 24\.0 GiB is available: use --dtype bfloat16"):
        llm_engine.LLMEngine(EngineArgs(model="random:llama-3-8b", device="cpu", dtype="float32"))


def test_worker_pids_counts_only_this_runs_workers():
    """another shardlm run on the machine (a process named like a worker, without this run's mark) is not
    counted: `make test` passes beside a running server"""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_SHARDLM_RUN"}
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "shardlm.worker.main"], env=env)
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "shardlm.worker.main"])
    try:
        time.sleep(0.5)
        pids = worker_pids()
        assert ours.pid in pids and other.pid not in pids
    finally:
        other.kill()
        ours.kill()
        other.wait()
        ours.wait()
