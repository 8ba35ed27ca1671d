"""`shardlm probe`: measure this machine through the engine itself and write a planner profile.

For each TP group size (powers of two up to the GPUs, or 1-2 processes on CPU) it starts the
engine on a tiny model with the real layer structure and measures, inside the workers:
all-reduce / all-to-all / send-recv latency over message sizes on the engine's TP group, and on
one device the copy bandwidth and GEMM rate. From the driver it times whole engine steps of the
tiny model at two depths (4 and 48 layers, both up at once, taking turns): the median batch-1
decode step grows by the host floor of each added layer (kernel launches + the layer's
all-reduces), and what is left at zero layers is the step's own overhead; the first token of a
128-token prompt gives a prefill step's. With `--model` it also times that model's own layers the
same way (random weights at model_depths' two depths), for the planner to use on models of that shape
(the tiny layer's kernels run shorter than wide ones). The output follows the schema in
shardlm/planner/profile.py; it is written after each group size, so a probe cut short keeps the
sizes it finished.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from ..common.config import ConfigError, ModelConfig, check_output_path
from ..common.layout import LayoutError
from ..common.messages import Probe
from ..common.model_source import ModelSource, resolve_model, with_random_layers
from ..planner.profile import LayerLine
from .bench import run_batch
from .llm import LLM

GPU_SIZES = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
CPU_SIZES = [16 << 10, 256 << 10, 1 << 20]
# the same tiny layer at two depths: the host floor per layer is the slope of the step time, the step's
# own overhead what is left at zero layers (the shallow model sits close to it)
PROBE_MODELS = ("random:probe-tiny-shallow", "random:probe-tiny-deep")
MODEL_DEEPEST = 32
"""the deepest `--model` times a model on a GPU (model_depths)"""


def model_depths(layers: int, device: str) -> tuple[int, int]:
    """The two layer counts at which `--model` times a model of `layers` layers on `device`. On a GPU up to
    MODEL_DEEPEST deep and half that: the step must outlast the host's work at both depths, or the slope
    between them shows host time, not the layers' (depths 2 and 8 of Llama-3-8B on an H200 gave 66 us a
    layer; its weights alone take 104 us to read). On the CPU a layer outlasts the host's work: 2 and 8."""
    if device != "cuda":
        return 2, 8
    deep = max(2, min(layers, MODEL_DEEPEST))
    return deep // 2, deep
DECODE_INPUT, DECODE_OUTPUT, PROMPT_LEN = 8, 48, 128
"""the timed decode (prompt, new tokens) and the timed first token's prompt"""
DTYPES = {"cuda": ("bfloat16", 2), "cpu": ("float32", 4)}
"""what the probe's engines run in per device (the engine's defaults), with its bytes per element"""


def topology() -> dict[str, str]:
    """How the GPUs are linked, from `nvidia-smi topo -m` (raw text kept for the record)."""
    if not shutil.which("nvidia-smi"):
        return {"interconnect": "cpu", "raw": ""}
    try:
        raw = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {"interconnect": "unknown", "raw": ""}
    cells = [c for line in raw.splitlines() if line.startswith("GPU") for c in line.split()[1:]]
    links = {c for c in cells if re.fullmatch(r"NV\d+|SYS|NODE|PHB|PXB|PIX", c)}
    kind = "nvlink" if links and all(c.startswith("NV") for c in links) else ("pcie" if links else "unknown")
    return {"interconnect": kind, "raw": raw}


def _group_sizes(device: str, max_size: int | None) -> list[int]:
    if device == "cuda":
        import torch

        limit = torch.cuda.device_count()
    else:
        limit = 2
    if max_size is not None:
        limit = min(limit, max_size)
    sizes, n = [], 1
    while n <= limit:
        sizes.append(n)
        n *= 2
    return sizes


WIDE_BATCH = 32
"""batch of the probe's second decode measurement (per-sequence host time)"""


def _host_times(llm: LLM, wide: bool, seed: int) -> tuple[float, float, float]:
    """(median batch-1 decode step, time to the first token of a 128-token prompt, median decode step at
    WIDE_BATCH if `wide` else 0), seconds. Each call needs its own `seed`: the same prompt again would be
    found in the prefix cache, and its prefill mostly skipped."""
    step = run_batch(llm, batch=1, input_len=DECODE_INPUT, output_len=DECODE_OUTPUT, seed=seed)["step_p50_ms"]
    ttft = run_batch(llm, batch=1, input_len=PROMPT_LEN, output_len=2, seed=seed)["ttft_ms"]
    step_wide = (run_batch(llm, batch=WIDE_BATCH, input_len=DECODE_INPUT, output_len=DECODE_OUTPUT,
                           seed=seed)["step_p50_ms"] if wide else 0.0)
    return step / 1e3, ttft / 1e3, step_wide / 1e3


def _probe_llm(model: str | ModelSource, n: int, device: str, **kwargs: Any) -> LLM:
    """An engine the probe times: TP size n, the device's probe dtype, short sequences, a small KV cache."""
    return LLM(model, tensor_parallel_size=n, device=device, dtype=DTYPES[device][0], max_model_len=512,
               kv_cache_memory_bytes=256 << 20, **kwargs)


def _decode_graph_us(llm: LLM) -> dict[str, float]:
    """The engine's decode graphs replayed at a few batches, rank 0's answer (worker/probe.py
    decode_graph_times; {} without captured graphs)"""
    return llm.engine.executor.call(Probe([], 1, False, graph_times=True))[0]["decode_graph_us"]


def _depth_times(n: int, device: str, models: list[str | ModelSource], measure: bool, rounds: int = 3,
                 model_kernels: bool = False
                 ) -> tuple[dict[int, tuple[float, float, float]], dict[str, Any], dict[str, Any]]:
    """Host times of `models` (one model at different depths) at each depth; with `measure`, the
    collective/device measurements and a wide batch on the first model (with `model_kernels`, its decode
    attention on rank 0's heads and a dense layer's GEMMs on rank 0's shards: worker/probe.py
    attention_times, layer_gemm_times; and every model's decode graphs replayed, decode_graph_times, by
    depth); and how the engines ran (the profile's "engine": CUDA graphs for
    decode, the attention path).

    The depths stay up side by side and take turns, `rounds` times; each number is the median over
    the rounds, so a slow spell of a shared host weighs on every depth alike.
    """
    sizes, iters = (GPU_SIZES, 50) if device == "cuda" else (CPU_SIZES, 10)
    with contextlib.ExitStack() as stack:
        llms = [stack.enter_context(_probe_llm(m, n, device)) for m in models]
        measured = (llms[0].engine.executor.call(Probe(sizes if n > 1 else [], iters, device_rates=n == 1))[0]
                    if measure else {})
        if model_kernels:
            rank0 = llms[0].engine.executor.call(Probe([], 1, False, model_kernels=True))[0]
            measured.update(attention=rank0["attention"], attention_fp8=rank0.get("attention_fp8"),
                            layer_gemms=rank0["layer_gemms"])
            graphs = {str(llm.engine.source.config.num_hidden_layers): _decode_graph_us(llm) for llm in llms}
            if all(graphs.values()):  # (every depth's graphs: two points per batch)
                measured["decode_graph_us"] = graphs
        samples: dict[int, list[tuple[float, float, float]]] = {}
        for r in range(rounds):
            for i, llm in enumerate(llms):
                samples.setdefault(llm.engine.source.config.num_hidden_layers, []).append(
                    _host_times(llm, measure and i == 0, seed=r))
    times = {layers: tuple(statistics.median(x[k] for x in got) for k in range(3)) for layers, got in samples.items()}
    return times, measured, {"cuda_graphs": llms[0].engine.cuda_graphs,
                             "attention_backend": llms[0].engine.attention_backend,
                             "rank_checks": llms[0].engine.rank_checks}


def _model_to_time(model: str, device: str) -> tuple[ModelSource, dict[str, Any]]:
    """The `--model` argument as a spec (its weights are never read: a Hugging Face config.json, or a folder
    holding one, will do) and its planner layer shape in the probe's dtype on `device`."""
    from ..planner.models import from_engine_config

    path = Path(model).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.suffix == ".json" and config_file.is_file():
        try:
            hf = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid JSON: {exc}") from None
        spec = ModelSource(model, "random", None, ModelConfig.from_hf(hf, str(config_file)))
    else:
        spec = resolve_model(model)
    spec.config.validate()
    if spec.config.is_moe:
        raise ConfigError(f"--model times a dense model's layers; {spec.name} is a mixture-of-experts model "
                          f"(its decode steps run eagerly through the routed experts): drop --model")
    shape = dict(from_engine_config(spec.config, spec.name).layer_shape)
    shape["bytes_per_param"] = DTYPES[device][1]
    return spec, shape


def run_probe(device: str = "auto", max_group: int | None = None, log=print, model: str | None = None,
              save: Callable[[dict[str, Any]], None] | None = None, serving: bool = False) -> dict[str, Any]:
    """The profile of this machine; `save` gets the profile so far after each group size (a probe cut
    short, say by a time limit, still leaves the sizes it finished). serving: also the server's overhead on
    a request's first token (serving_overhead_us), measured last."""
    from ..engine.llm_engine import resolve_device

    device = resolve_device(device)
    spec, shape = _model_to_time(model, device) if model is not None else (None, None)
    profile: dict[str, Any] = {"version": 1, "topology": topology(), "engine": {"cuda_graphs": False, "attention_backend": "torch"},
                               "allreduce": {}, "all_to_all": {}, "step_overhead_us": {}, "layer_floor_us": {},
                               "prefill_overhead_us": {}, "eager_layer_floor_us": {}, "step_overhead_per_seq_us": {}}
    if spec is not None:
        profile["model_layers"] = {"model": spec.name, "shape": shape,
                                   "decode_context": DECODE_INPUT + DECODE_OUTPUT / 2, "prompt_len": PROMPT_LEN,
                                   "times_ms": {}}
    for n in _group_sizes(device, max_group):
        log(f"probe: group of {n} ...")
        times, measured, engine = _depth_times(n, device, list(PROBE_MODELS), measure=True)
        checks = engine.pop("rank_checks")
        profile["engine"].update(engine)
        for c in checks:  # each GPU's start-up GEMV (the largest group's, measured last, stands)
            if c.gpu_index is not None:
                profile.setdefault("gpu_gemv_gbps", {})[str(c.gpu_index)] = c.gemv_gbps
        if n > 1 and any(c.gpu_index is not None for c in checks):
            profile["stragglers"] = [c.gpu_index for c in checks if c.straggler]
            for c in checks:
                if c.straggler:
                    log(f"probe: {c.where()} is a straggler: GEMV {c.gemv_gbps:,.0f} GB/s against "
                        f"{c.peers_gbps:,.0f} on the other GPUs; the planner paces groups that hold it by it")
        # the same engine at two depths: a step grows by each added layer's floor (tiny layers: the host
        # launching their kernels, or with CUDA graphs the replayed kernels themselves); the intercept is
        # the step's own overhead. Prefill steps (eager, or mixed-step graphs) have a line of their own.
        (l1, (step1, ttft1, wide1)), (l2, (step2, ttft2, _)) = sorted(times.items())
        profile.setdefault("depth_times_ms", {})[str(n)] = _points_ms(times)  # informational: the lines' points
        profile["depth_times_ms"][str(n)][str(l1)][f"decode_step_b{WIDE_BATCH}"] = wide1 * 1e3
        # each further sequence of a step: the host's share (inputs, sampling, the driver's bookkeeping;
        # the tiny model's GPU work barely grows)
        profile["step_overhead_per_seq_us"][str(n)] = max(0.0, (wide1 - step1) / (WIDE_BATCH - 1)) * 1e6
        for key, t1, t2, overhead in (("layer_floor_us", step1, step2, "step_overhead_us"),
                                      ("eager_layer_floor_us", ttft1, ttft2, "prefill_overhead_us")):
            line = LayerLine.through(l1, t1 * 1e6, l2, t2 * 1e6)
            profile[key][str(n)], profile[overhead][str(n)] = line.per_layer_us, line.zero_layers_us
        if n == 1:
            profile.update(measured["device_info"])  # the card (or CPU) the profile describes, read by rank 0
            profile["hbm_gbps"], profile["gemm_tflops"] = measured["hbm_gbps"], measured["gemm_tflops"]
            for key in ("gemv", "gemv_rows", "gemv_fp8"):
                if key in measured:
                    profile[key] = measured[key]
        else:
            profile["allreduce"][str(n)] = measured["allreduce"]
            if "allreduce_graph" in measured:
                profile.setdefault("allreduce_graph", {})[str(n)] = measured["allreduce_graph"]
            profile["all_to_all"][str(n)] = measured["all_to_all"]
            if "allreduce_limits" in measured:  # the peer-memory paths against NCCL (worker/probe.py)
                profile.setdefault("allreduce_paths", {})[str(n)] = measured["allreduce_paths"]
                lim = profile.setdefault("allreduce_limits", {})[str(n)] = measured["allreduce_limits"]
                log(f"probe: group of {n}: all-reduce over peer memory: one-shot up to {lim['one_shot_max_bytes']} B, "
                    f"two-shot up to {lim['two_shot_max_bytes']} B, NCCL above (saved to {lim.get('saved')}, "
                    f"read by the engine at start-up)")
            profile.setdefault("send_recv", measured["send_recv"])
        log(f"probe: group of {n}: decode layer floor {profile['layer_floor_us'][str(n)]:.0f} us, step overhead "
            f"{profile['step_overhead_us'][str(n)]:.0f} us; prefill layer floor "
            f"{profile['eager_layer_floor_us'][str(n)]:.0f} us, overhead {profile['prefill_overhead_us'][str(n)]:.0f} us; "
            f"{profile['step_overhead_per_seq_us'][str(n)]:.0f} us per further sequence"
            f"{' (decode as CUDA graphs)' if engine['cuda_graphs'] else ''}")
        if spec is not None:
            _time_model_layers(spec, n, device, profile["model_layers"], log)
        if save is not None:
            save(_without_empty_model_layers(profile))
    if serving:
        overhead = serving_overhead_us(device, log)
        if overhead is not None:
            profile["serving_overhead_us"] = overhead
            if save is not None:
                save(_without_empty_model_layers(profile))
    return _without_empty_model_layers(profile)


def _without_empty_model_layers(profile: dict[str, Any]) -> dict[str, Any]:
    """The profile, less a `model_layers` no TP size has times for yet (run_probe_cli says so)."""
    if profile.get("model_layers", {}).get("times_ms"):
        return profile
    return {k: v for k, v in profile.items() if k != "model_layers"}


def _reason(exc: BaseException) -> str:
    """An error's first line for the probe's log (its type where it has no message)"""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _time_model_layers(spec: ModelSource, n: int, device: str, layers: dict[str, Any], log) -> None:
    """Time `spec`'s layers at TP size n into layers["times_ms"][str(n)] and, where the engine runs the
    attention kernels, its decode attention into layers["attention_us"][str(n)] (with an FP8 KV cache, on a GPU
    with FP8 tensor cores, into layers["attention_us_fp8"][str(n)]) and a dense layer's GEMMs
    into layers["gemm_us"][str(n)]; where it replays decode graphs, each depth's graphs at a few batches into
    layers["graph_us"][str(n)] (and with FP8 weights, on a GPU with FP8 tensor cores, into
    layers["graph_us_fp8"][str(n)]); a size the model cannot run at is left out."""
    try:
        depths = model_depths(spec.config.num_hidden_layers, device)
        times, measured, _ = _depth_times(n, device, [with_random_layers(spec, d) for d in depths], measure=False,
                                          model_kernels=device == "cuda")
    except (ConfigError, LayoutError, RuntimeError, OSError) as exc:  # heads not divisible, out of memory, ...
        log(f"probe: {spec.name} at TP={n} not timed: {_reason(exc)}")
        return
    layers["times_ms"][str(n)] = _points_ms(times)
    for key, name in (("attention", "attention_us"), ("attention_fp8", "attention_us_fp8")):
        if measured.get(key):
            layers.setdefault(name, {})[str(n)] = measured[key]
    if measured.get("layer_gemms"):
        layers.setdefault("gemm_us", {})[str(n)] = measured["layer_gemms"]
    if measured.get("decode_graph_us"):
        layers.setdefault("graph_us", {})[str(n)] = measured["decode_graph_us"]
        fp8 = _fp8_graph_times(n, device, [with_random_layers(spec, d) for d in depths], log)
        if fp8:
            layers.setdefault("graph_us_fp8", {})[str(n)] = fp8
    (d1, (s1, f1, _)), (d2, (s2, f2, _)) = sorted(times.items())
    decode, prefill = (LayerLine.through(d1, a * 1e6, d2, b * 1e6) for a, b in ((s1, s2), (f1, f2)))
    log(f"probe: {spec.name} at TP={n}: decode {decode.per_layer_us:.0f} us a layer, prefill of "
        f"{PROMPT_LEN} tokens {prefill.per_layer_us:.0f} us a layer")


def _fp8_graph_times(n: int, device: str, models: list[ModelSource], log) -> dict[str, dict[str, float]]:
    """{depth: {batch: us}}: the decode graphs of `models` (one model at two depths) with FP8 weights
    (quantization="fp8"; the KV cache and the LM head in the model dtype), replayed as decode_graph_times does;
    {} where the engine cannot run them (a GPU without FP8 tensor cores: its error is logged). The planner
    takes an FP8 layer's correction from these (the FP8 GEMMs timed alone, layer_gemm_times, are not the
    engine's step: session 19 timed them 11-14 us a layer longer at 1 and 8 rows than the engine's graphs ran
    them)."""
    if device != "cuda":
        return {}
    out = {}
    try:
        for m in models:  # (one at a time: an FP8 copy beside the other depth's would need the memory of both)
            with _probe_llm(m, n, device, quantization="fp8") as llm:
                out[str(m.config.num_hidden_layers)] = _decode_graph_us(llm)
    except (ConfigError, LayoutError, RuntimeError, OSError, ValueError) as exc:
        log(f"probe: {models[0].name} in FP8 at TP={n}: decode graphs not replayed: {_reason(exc)}")
        return {}
    if not all(out.values()):
        log(f"probe: {models[0].name} in FP8 at TP={n}: the engine captured no decode graphs to replay")
        return {}
    return out


SERVING_MODEL = "random:probe-tiny-shallow"
"""the model `probe --serving` serves: its steps are short, so what the client waits beyond the engine is
the server's own (HTTP, the hand-over to the engine thread, streaming) and the client's"""
SERVING_REQUESTS = (4, 24)
"""`probe --serving`: requests sent first (start-up: compilation, first allocations), then those timed"""
SERVING_TIMEOUT_S = 120
"""`probe --serving`: the longest either round of requests may take (a stuck stream is not waited for)"""


def serving_overhead_us(device: str, log) -> float | None:
    """What a served request's time to its first token holds beyond the engine's own, us: `shardlm serve`
    started on SERVING_MODEL (its own process, on `device`), SERVING_REQUESTS of 128 prompt tokens sent one at
    a time by bench serve's client, the client's mean TTFT less the server's (from when its engine thread
    took a request in: the /metrics histogram bench serve reads). None, said in the log, where the web stack
    is not installed, the server did not come up or the requests failed: the rest of the profile stands."""
    import asyncio
    import os
    import socket
    import tempfile
    import time

    try:
        import fastapi  # noqa: F401  (what `shardlm serve` needs)
        import httpx
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        log(f"probe: serving overhead not measured: {exc.name} is not installed (pip install fastapi uvicorn "
            f"httpx prometheus-client)")
        return None
    from .bench_serve import make_workload, run, server_counters, server_view

    with socket.socket() as s:  # a free port (released for the server to bind)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as server_log:
        proc = subprocess.Popen([sys.executable, "-m", "shardlm.entrypoints.cli", "serve", SERVING_MODEL, "--port",
                                 str(port), "--device", device, "--max-model-len", "512",
                                 "--kv-cache-memory-bytes", str(256 << 20)],
                                stdout=server_log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    server_log.seek(0)
                    tail = server_log.read().strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                    log(f"probe: serving overhead not measured: the server exited ({tail[0]})")
                    return None
                try:
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    log("probe: serving overhead not measured: the server was not ready after 300 s")
                    return None
                time.sleep(0.5)
            warm, timed = SERVING_REQUESTS

            def one_at_a_time(n: int, seed: int) -> dict[str, Any]:
                return asyncio.run(asyncio.wait_for(
                    run(url, SERVING_MODEL, 0, make_workload(n, 128, 8, 0, 1000, seed), None, seed, 1),
                    SERVING_TIMEOUT_S))

            one_at_a_time(warm, 1)
            before = asyncio.run(server_counters(url, None))
            result = one_at_a_time(timed, 2)
            after = asyncio.run(server_counters(url, None))
        except Exception as exc:  # (a stuck stream, the server gone mid-run: the profile keeps the rest)
            log(f"probe: serving overhead not measured: {type(exc).__name__}: {exc}")
            return None
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if result["failed"]:
        log(f"probe: serving overhead not measured: {result['failed']} of {timed} requests failed "
            f"{result.get('errors') or ''}".rstrip())
        return None
    if before is None or after is None:
        log("probe: serving overhead not measured: the server's /metrics lacks the engine's TTFT histogram")
        return None
    engine_ms = server_view(before, after)["engine_ms"]["ttft_mean"]
    overhead = max(0.0, result["ttft_ms"]["mean"] - engine_ms) * 1e3
    log(f"probe: a served request's first token: {result['ttft_ms']['mean']:.1f} ms at the client, "
        f"{engine_ms:.1f} in the engine: {overhead / 1e3:.1f} ms of serving overhead")
    return overhead


def _points_ms(times: dict[int, tuple[float, float, float]]) -> dict[str, dict[str, float]]:
    """_depth_times' seconds per depth as {depth: {"decode_step": ms, "ttft": ms}}."""
    return {str(d): {"decode_step": step * 1e3, "ttft": ttft * 1e3} for d, (step, ttft, _) in times.items()}


def add_probe_parser(sub) -> None:
    p = sub.add_parser("probe", help="measure this machine (collectives, memory, GEMM, host floor) for the planner")
    p.add_argument("--out", default="probe.json", help="profile to write (use with `shardlm plan --profile`)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--max-group", type=int, default=None, help="largest TP group to measure")
    p.add_argument("--model", default=None,
                   help="also time this dense model's own layers, with random weights: random:<preset>, a Hugging "
                        "Face config.json (or its folder), or any model the engine loads; `plan --profile` then "
                        "uses the times for models of that shape")
    p.add_argument("--serving", action="store_true",
                   help="also start `shardlm serve` on a tiny model and time what a request's first token waits "
                        "beyond the engine (HTTP, streaming): plan --validate adds it to served requests' TTFT "
                        "(needs fastapi, uvicorn, httpx, prometheus-client)")


def run_probe_cli(args) -> int:
    if args.max_group is not None and args.max_group < 1:
        raise ValueError(f"--max-group must be >= 1, got {args.max_group}")
    check_output_path("--out", args.out)
    out = Path(args.out).expanduser()

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    def save(profile: dict[str, Any]) -> None:  # whole files only: a probe killed mid-write keeps the last one
        part = out.with_name(out.name + ".part")
        part.write_text(json.dumps(profile, indent=2))
        part.replace(out)
        log(f"probe: saved groups {sorted(profile['layer_floor_us'], key=int)} to {out}")

    profile = run_probe(args.device, args.max_group, log=log, model=args.model, save=save, serving=args.serving)
    print(f"wrote {args.out}: {profile['device']}, copy {profile['hbm_gbps']:.0f} GB/s, "
          f"GEMM {profile['gemm_tflops']:.1f} TFLOP/s, groups {sorted(profile['layer_floor_us'], key=int)}")
    if args.model is not None and "model_layers" not in profile:
        print(f"error: {args.model} could not be timed at any TP size (see above): the profile has the "
              f"machine's numbers but no model_layers", file=sys.stderr)
        return 1
    return 0
