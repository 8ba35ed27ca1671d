"""The server's per-GPU, worker step-time, restart and readiness metrics (server/metrics.py), with a fake
NVML and stub replicas; one real CPU engine checks the workers' step accounting end to end."""

from types import SimpleNamespace

import pytest

from shardlm.engine.stats import BlockStats, EngineStats, SchedulerStats
from shardlm.server import metrics as metrics_mod
from shardlm.server.metrics import REFRESH_INTERVAL_S, Metrics

GPU_GAUGES = ("shardlm:gpu_utilization_percent", "shardlm:gpu_memory_used_bytes", "shardlm:gpu_memory_total_bytes",
              "shardlm:gpu_temperature_celsius", "shardlm:gpu_power_watts")


class FakeNVML:
    """The part of pynvml metrics.py uses: 8 GPUs whose readings derive from their index."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init: bool = False, no_power: frozenset[int] = frozenset()):
        self.fail_init, self.no_power = fail_init, no_power
        self.inits = 0
        self.reads = 0

    def nvmlInit(self):
        self.inits += 1
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < 8:
            raise self.NVMLError("Invalid Argument")
        return ("gpu", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return ("gpu", int(uuid.removeprefix("GPU-uuid")))

    def nvmlDeviceGetIndex(self, h):
        return h[1]

    def nvmlDeviceGetUtilizationRates(self, h):
        self.reads += 1
        return SimpleNamespace(gpu=10 * h[1], memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=h[1] * 2**30, total=80 * 2**30, free=0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 40 + h[1]

    def nvmlDeviceGetPowerUsage(self, h):
        if h[1] in self.no_power:
            raise self.NVMLError("Not Supported")
        return 100_000 + 1000 * h[1]  # milliwatts


class StubEngine:
    """What Metrics reads of an LLMEngine."""

    def __init__(self, device="cuda", first_device=0, world_size=2, external_workers=False):
        self.device = device
        self.args = SimpleNamespace(first_device=first_device, external_workers=external_workers)
        self.layout = SimpleNamespace(world_size=world_size)
        self.source = SimpleNamespace(config=SimpleNamespace(is_moe=False))
        self.stage_stats_calls = []
        self.generated = 0

    def stats(self):
        return EngineStats(SchedulerStats(running=1, waiting=0, num_preemptions=0),
                           BlockStats(num_blocks=10, usage=0.1, prefix_queries=0, prefix_hits=0),
                           generated_tokens=self.generated, last_step_exec_s=0.01)

    def stage_stats(self, reset=False):
        self.stage_stats_calls.append(reset)
        return {r: {"pp": 0, "tp": r, "busy_s": 0.5 * (r + 1), "window_s": 2.0, "steps": 10 if r else 0,
                    "graph_steps": 7 if r else 0, "idle_fraction": 0.5} for r in range(self.layout.world_size)}


def replica(index=0, **engine):
    return SimpleNamespace(index=index, engine=StubEngine(**engine), load=0, submitted=0)


@pytest.fixture
def clock(monkeypatch):
    """metrics.py's time.monotonic, moved by hand."""
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(metrics_mod, "time", SimpleNamespace(monotonic=lambda: now.t))
    return now


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNVML()
    monkeypatch.setattr(metrics_mod, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def value(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, {"model_name": "m", **labels})


def gpu_samples(m: Metrics) -> list:
    return [s for fam in m.registry.collect() if fam.name.startswith("shardlm:gpu_") for s in fam.samples]


def test_gpu_gauges_per_rank_of_each_replica(nvml, clock):
    m = Metrics("m")
    # data-parallel replica 1 of tp=2: its ranks 0 and 1 run on GPUs 2 and 3; GPU 3 reports no power
    nvml.no_power = frozenset({3})
    m.on_tick(replica(1, first_device=2))
    lbl = {"replica": "1", "rank": "1", "gpu": "3"}
    assert value(m, "shardlm:gpu_utilization_percent", **lbl) == 30
    assert value(m, "shardlm:gpu_memory_used_bytes", **lbl) == 3 * 2**30
    assert value(m, "shardlm:gpu_memory_total_bytes", **lbl) == 80 * 2**30
    assert value(m, "shardlm:gpu_temperature_celsius", **lbl) == 43
    assert value(m, "shardlm:gpu_power_watts", **lbl) is None  # not supported: left out, the rest is there
    assert value(m, "shardlm:gpu_power_watts", replica="1", rank="0", gpu="2") == 102.0
    assert {(s.labels["rank"], s.labels["gpu"]) for s in gpu_samples(m)} == {("0", "2"), ("1", "3")}
    assert {s.name for s in gpu_samples(m)} == set(GPU_GAUGES)
    assert all(set(s.labels) == {"model_name", "replica", "rank", "gpu"} for s in gpu_samples(m))
    assert nvml.inits == 1
    m.on_tick(replica(0, first_device=0))
    assert value(m, "shardlm:gpu_temperature_celsius", replica="0", rank="1", gpu="1") == 41
    assert nvml.inits == 1  # NVML is started once


def test_gpu_index_follows_cuda_visible_devices(nvml, clock, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,GPU-uuid7,6")
    m = Metrics("m")
    m.on_tick(replica(0, first_device=0, world_size=3))
    assert {s.labels["rank"]: s.labels["gpu"] for s in gpu_samples(m)} == {"0": "5", "1": "7", "2": "6"}


@pytest.mark.parametrize("case", ["cpu", "external_workers", "nvml_fails", "no_such_gpu"])
def test_no_gpu_gauges_without_local_gpus_or_nvml(nvml, clock, case):
    nvml.fail_init = case == "nvml_fails"
    m = Metrics("m")
    rep = replica(0, device="cpu" if case == "cpu" else "cuda", external_workers=case == "external_workers",
                  first_device=7 if case == "no_such_gpu" else 0)  # rank 1 would be GPU 8 of 8
    m.on_tick(rep)
    m.on_tick(rep)
    labels = {(s.labels["rank"], s.labels["gpu"]) for s in gpu_samples(m)}
    assert labels == ({("0", "7")} if case == "no_such_gpu" else set())
    assert (b"shardlm:gpu_temperature_celsius{" in m.render()) == (case == "no_such_gpu")
    assert nvml.inits == (1 if case in ("nvml_fails", "no_such_gpu") else 0)


def test_on_tick_respects_the_interval_and_reads_step_times_after_steps(nvml, clock):
    m = Metrics("m")
    rep = replica(0)
    m.on_tick(rep)
    assert nvml.reads == 2 and rep.engine.stage_stats_calls == []  # no step yet: no round trip to the workers
    m.on_step(rep, [])
    m.on_tick(rep)  # within the interval: nothing
    clock.t += REFRESH_INTERVAL_S - 0.01
    m.on_tick(rep)
    assert nvml.reads == 2 and rep.engine.stage_stats_calls == []
    clock.t += 0.01
    m.on_tick(rep)
    assert nvml.reads == 4 and rep.engine.stage_stats_calls == [True]  # read and reset
    assert value(m, "shardlm:worker_step_seconds", replica="0", rank="1") == pytest.approx(0.1)
    assert value(m, "shardlm:worker_step_seconds", replica="0", rank="0") is None  # it ran no step
    assert value(m, "shardlm:worker_steps_total", replica="0", rank="1", mode="graph") == 7
    assert value(m, "shardlm:worker_steps_total", replica="0", rank="1", mode="eager") == 3
    clock.t += REFRESH_INTERVAL_S
    m.on_tick(rep)  # idle since: GPUs again, the workers not
    assert nvml.reads == 6 and rep.engine.stage_stats_calls == [True]


def test_restarts_and_readiness():
    m = Metrics("m")
    r0, r1 = replica(0), replica(1)
    m.on_restart(r1, "died")
    m.on_restart(r1, "died")
    m.on_restart(r1, "hung")
    assert value(m, "shardlm:worker_restarts_total", replica="1", cause="died") == 2
    assert value(m, "shardlm:worker_restarts_total", replica="1", cause="hung") == 1
    assert value(m, "shardlm:worker_restarts_total", replica="0", cause="died") is None
    m.set_ready(r0, True)
    m.set_ready(r1, True)
    m.set_ready(r1, False)
    assert value(m, "shardlm:replica_ready", replica="0") == 1
    assert value(m, "shardlm:replica_ready", replica="1") == 0


def test_real_cpu_engine_step_times_and_no_gpu_gauges(clock):
    from shardlm.engine.arg_utils import EngineArgs
    from shardlm.engine.llm_engine import LLMEngine
    from shardlm.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineArgs(model="random:tiny-llama", tensor_parallel_size=2, device="cpu"))
    try:
        rep = SimpleNamespace(index=0, engine=engine, load=1, submitted=1)
        m = Metrics("m")
        engine.add_request("r", None, [5, 6, 7, 8], SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished_requests():
            m.on_step(rep, engine.step())
            m.on_tick(rep)
        assert value(m, "shardlm:generation_tokens_total") == 4
        assert gpu_samples(m) == []
        for rank in ("0", "1"):
            assert 0 < value(m, "shardlm:worker_step_seconds", replica="0", rank=rank) < 10
    finally:
        engine.shutdown()


def test_replica_load_falls_to_zero_when_idle(clock):
    """the load gauge follows the replica between steps too (it stayed at its last step's value)"""
    m = Metrics("m")
    rep = replica(0)
    rep.load = 3
    m.on_step(rep, [])
    assert value(m, "shardlm:replica_load", replica="0") == 3
    rep.load = 0  # the requests finished; no step runs while idle, ticks still come
    m.on_tick(rep)
    assert value(m, "shardlm:replica_load", replica="0") == 0


def test_the_grafana_dashboard_reads_only_exported_metrics():
    """docs/grafana-dashboard.json's queries name metrics the server exports (a renamed metric would leave a
    panel empty without an error)"""
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"shardlm:[a-z0-9_]+", e)}
    exported = set()
    for fam in Metrics("m").registry.collect():  # (families with no sample yet: names only, no suffixes)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(fam.type, ("",))
        exported |= {fam.name + s for s in suffixes}
    assert len(used) >= 10 and not used - exported, used - exported
