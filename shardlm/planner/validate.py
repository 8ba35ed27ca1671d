"""`shardlm plan --validate`: compare the cost model's TTFT and TPOT with what `shardlm bench latency --json`
measured.

A measured file (what bench writes; other keys are ignored):

    {"model": "random:llama-3-8b" | a preset name | a Hugging Face folder or config.json | a .gguf file,
     "tensor_parallel_size": 2, "pipeline_parallel_size": 1, "expert_parallel_size": 1,
     "dtype": "bfloat16", "device": "cuda",
     "results": [{"batch": 1, "input_len": 128, "output_len": 64, "ttft_ms": .., "tpot_ms": .., ...}, ...]}

For each result row the layout is tp=tensor_parallel_size, pp=pipeline_parallel_size (default 1),
ep=expert_parallel_size (default 1), dp=1 on one node, and the planner predicts
  TTFT  one prefill step of `batch` prompts of input_len tokens (batch * input_len tokens in all),
  TPOT  one decode step of `batch` sequences with input_len + output_len / 2 tokens of KV each
        (the mean context over the run),
with the GPU, interconnect and profile given on the command line. The signed error is
100 * (predicted - measured) / measured; the summary is the median of its absolute values. The measured
TPOT is the mean step (tpot_ms), host jitter and all. Where the file has itl_p50_ms (the median gap
between two tokens of a request; bench writes it) the prediction is also compared with that, the typical
step without the tail; tpot_p50_ms, when present, is carried along in the JSON. Where the file names the
step budget (max_num_batched_tokens) and a batch's prompts exceed it, they prefill in chunks and the TPOT
prediction carries the chunks the early sequences decode beside (predict_row).

Files measured at two layouts or more for one workload also get a recommendation check (recommendation_checks).

A `shardlm bench serve --json` file (it has per_request) is replayed instead: its completed requests (when
sent, prompt and generated tokens) through planner/serving.py's simulation of the engine the server
reported (its /engine settings, under "engine"), and the TTFT and TPOT p50/p90/p99 compared.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..common.defaults import MAX_NUM_SEQS
from ..common.layout import ParallelLayout
from . import PlanError, read_json
from .cost import CostModel, stage_shards
from .hardware import default_interconnect, get_gpu, make_cluster
from .models import ModelSpec, from_engine_config, load_model
from .plan import constraint_reasons, model_layers_note
from .profile import Profile
from .serving import PCTS, Request, percentiles_ms, simulate

DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float32": 4, "fp32": 4, "float": 4}


@dataclass(frozen=True)
class MeasuredRow:
    """One result row of a measured file."""

    batch: int
    """Sequences submitted at once."""
    input_len: int
    """Prompt tokens per sequence."""
    output_len: int
    """Generated tokens per sequence."""
    ttft_ms: float
    """Measured time to the batch's first token (one prefill step), ms."""
    tpot_ms: float
    """Measured mean decode step, ms."""
    tpot_p50_ms: float | None = None
    """Measured median over requests of their mean decode step, ms, if the file has it."""
    itl_p50_ms: float | None = None
    """Measured median inter-token latency, ms, if the file has it."""


@dataclass(frozen=True)
class MeasuredFile:
    """A `shardlm bench latency --json` result file."""

    path: str
    """Where it was read from."""
    model: str
    """The model the engine ran (as the file names it)."""
    tp: int
    """Tensor-parallel size the engine ran with."""
    bytes_per_param: int
    """Weight bytes per element from the file's dtype (2 when absent)."""
    rows: tuple[MeasuredRow, ...]
    """The measured points, at least one."""
    pp: int = 1
    """Pipeline stages the engine ran with."""
    ep: int = 1
    """Expert-parallel size (1: experts split like the MLP)."""
    cuda_graphs: bool | None = None
    """Whether the engine replayed decode steps as CUDA graphs (None: the file does not say)."""
    quantization: str | None = None
    """'fp8' where the engine ran FP8 weights (ModelSpec.quantization; absent: the model dtype)"""
    fp8_lm_head: bool = False
    """the engine's LM head was FP8 too (absent: in the model dtype)"""
    kv_fp8: bool = False
    """the engine's KV cache was FP8 (kv_cache_dtype; absent: the model dtype)"""
    attention_backend: str = "torch"
    """The engine's attention path: 'triton' or 'torch' (files from before the kernels do not say: torch)."""
    async_scheduling: bool = False
    """Whether the engine overlapped its host work with the previous step (files from before it: False)."""
    max_num_batched_tokens: int | None = None
    """The engine's step budget (None: files from before bench wrote it, whose batches prefilled in one step)."""
    max_num_seqs: int | None = None
    """The engine's limit of running sequences (serve files)."""
    data_parallel_size: int = 1
    """Engine replicas behind the server (serve files)."""

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, ep=self.ep)


@dataclass(frozen=True)
class ValidationRow:
    """Prediction vs measurement for one result row."""

    file: str
    """Measured file the row came from."""
    model: str
    """Model as the file names it."""
    layout: str
    """Layout predicted ("tp=2 pp=1 ep=1"; " fp8" where the weights were FP8, " kv-fp8" where the KV cache)."""
    tp: int
    """Tensor-parallel size."""
    gpus: int
    """GPUs the layout ran on."""
    batch: int
    """Sequences per step."""
    input_len: int
    """Prompt tokens per sequence."""
    output_len: int
    """Generated tokens per sequence."""
    context: float
    """KV context of the predicted decode step: input_len + output_len / 2."""
    ttft_ms_pred: float
    """Predicted TTFT, ms."""
    ttft_ms_meas: float
    """Measured TTFT, ms."""
    ttft_err_pct: float
    """100 * (predicted - measured) / measured."""
    tpot_ms_pred: float
    """Predicted TPOT, ms."""
    tpot_ms_meas: float
    """Measured TPOT (mean step), ms."""
    tpot_err_pct: float
    """100 * (predicted - measured) / measured."""
    tpot_p50_ms_meas: float | None = None
    """Measured median over requests of their mean decode step, ms, if the file has it."""
    itl_p50_ms_meas: float | None = None
    """Measured median inter-token latency, ms, if the file has it."""
    itl_err_pct: float | None = None
    """100 * (predicted decode step - median inter-token latency) / that latency, if measured (the step
    without the share of chunked prefills that TPOT carries)."""


@dataclass(frozen=True)
class ServingRow:
    """A bench serve run's percentiles, predicted by simulating its requests (planner/serving.py) and
    measured."""

    file: str
    model: str
    layout: str
    """As ValidationRow's, with " dp=N" for several replicas."""
    request_rate: float
    """Mean arrivals per second the run sent (0: all at once)."""
    requests: int
    """Requests completed (the ones simulated)."""
    metric: str
    """"ttft" or "tpot"."""
    pred_ms: dict[str, float]
    """{"p50": .., "p90": .., "p99": ..} predicted."""
    meas_ms: dict[str, float]
    """The same measured."""
    err_pct: dict[str, float]
    """100 * (predicted - measured) / measured per percentile."""


RECOMMENDATION_TOLERANCE_PCT = 10.0
"""the recommendation check's margin: the planner's pick may measure this much worse than the best"""


@dataclass(frozen=True)
class RecommendationCheck:
    """The layout the planner predicts best among the measured ones for a workload and objective, against
    the one measured best."""

    model: str
    batch: int
    input_len: int
    output_len: int
    objective: str
    """"latency" (the shortest decode step, TPOT) or "throughput" (the most decode tokens/s per GPU)."""
    layouts: int
    """Layouts measured at this workload."""
    recommended: str
    """The planner's pick (best predicted)."""
    best: str
    """The best measured."""
    shortfall_pct: float
    """How much worse the pick measured than the best, in % of the best (0 where they are the same)."""
    ok: bool
    """Within RECOMMENDATION_TOLERANCE_PCT."""


@dataclass
class Validation:
    """Every row's comparison and the summary."""

    rows: list[ValidationRow]
    """One per measured result row of the bench latency files, file by file."""
    median_abs_ttft_err_pct: float | None
    """Median of |TTFT error %| over all rows (None without bench latency files)."""
    median_abs_tpot_err_pct: float | None
    """Median of |TPOT error %| over all rows (None without bench latency files)."""
    median_abs_itl_err_pct: float | None
    """Median of |error %| against the median inter-token latency, over the rows that have it."""
    gpu: str
    """GPU preset predicted for."""
    interconnect: str
    """Interconnect preset predicted for."""
    hardware_source: str
    """"profile" or "datasheet"."""
    host_model: str
    """"measured" (profile's host floor) or "graph-captured" (the default assumptions)."""
    notes: list[str] = field(default_factory=list)
    """Remarks (profile used, model override)."""
    recommendations: list[RecommendationCheck] = field(default_factory=list)
    """Per workload measured at two layouts or more, per objective: the planner's pick against the best."""
    serving: list[ServingRow] = field(default_factory=list)
    """Per bench serve file, TTFT and TPOT percentiles predicted and measured."""


def _bad(path: str, where: str, what: str, got: Any) -> PlanError:
    shown = repr(got)
    return PlanError(f"measured file {path}: field {where!r} {what}, got {shown[:57] + '...' if len(shown) > 60 else shown}")


def _int(value: Any, path: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad(path, where, "must be a positive integer", value)
    return value


def _ms(value: Any, path: str, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise _bad(path, where, "must be a positive number of milliseconds", value)
    return float(value)


def parse_measured(data: Any, path: str = "<measured>") -> MeasuredFile:
    """Validate a measured dict (bench latency's JSON); errors name the file and the field."""
    if not isinstance(data, dict):
        raise PlanError(f"measured file {path}: must be a JSON object (`shardlm bench latency --json` output), "
                        f"got {type(data).__name__}")
    for key in ("model", "tensor_parallel_size", "results"):
        if key not in data:
            raise PlanError(f"measured file {path}: missing required field {key!r} "
                            "(write it with `shardlm bench latency --json FILE`)")
    results = data["results"]
    if not isinstance(results, list) or not results:
        raise _bad(path, "results", "must be a non-empty list of result rows", results)
    rows = []
    for i, r in enumerate(results):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            raise _bad(path, where, "must be an object", r)
        for key in ("batch", "input_len", "output_len", "ttft_ms", "tpot_ms"):
            if key not in r:
                raise PlanError(f"measured file {path}: {where} is missing field {key!r}")
        p50, itl = r.get("tpot_p50_ms"), r.get("itl_p50_ms")
        rows.append(MeasuredRow(
            batch=_int(r["batch"], path, f"{where}.batch"), input_len=_int(r["input_len"], path, f"{where}.input_len"),
            output_len=_int(r["output_len"], path, f"{where}.output_len"),
            ttft_ms=_ms(r["ttft_ms"], path, f"{where}.ttft_ms"), tpot_ms=_ms(r["tpot_ms"], path, f"{where}.tpot_ms"),
            tpot_p50_ms=None if p50 is None else _ms(p50, path, f"{where}.tpot_p50_ms"),
            itl_p50_ms=None if itl is None else _ms(itl, path, f"{where}.itl_p50_ms")))
    return _engine_file(data, path, tuple(rows))


def _engine_file(data: dict[str, Any], path: str, rows: tuple[MeasuredRow, ...], where: str = "") -> MeasuredFile:
    """The engine's settings in a measured file (at the top of bench latency's JSON, under `engine` in bench
    serve's: `where` prefixes the field names) as a MeasuredFile with these rows."""
    def field_name(key: str) -> str:
        return where + key

    for key in ("model", "tensor_parallel_size"):
        if key not in data:
            raise PlanError(f"measured file {path}: missing required field {field_name(key)!r}")
    if not isinstance(data["model"], str) or not data["model"].strip():
        raise _bad(path, field_name("model"), "must be a non-empty string", data["model"])
    tp = _int(data["tensor_parallel_size"], path, field_name("tensor_parallel_size"))
    pp = _int(data.get("pipeline_parallel_size", 1), path, field_name("pipeline_parallel_size"))
    ep = _int(data.get("expert_parallel_size", 1), path, field_name("expert_parallel_size"))
    if ep not in (1, tp):
        raise _bad(path, field_name("expert_parallel_size"), f"must be 1 or tensor_parallel_size ({tp}): the "
                   "engine's experts are split over the TP ranks", ep)
    dtype = data.get("dtype", "bfloat16")
    if not isinstance(dtype, str) or dtype.lower().removeprefix("torch.") not in DTYPE_BYTES:
        raise _bad(path, field_name("dtype"), f"must be one of {', '.join(DTYPE_BYTES)}", dtype)
    device = data.get("device", "cuda")
    if not isinstance(device, str) or not device.startswith("cuda"):
        raise _bad(path, field_name("device"), "must be a GPU device ('cuda'): the planner predicts GPU runs", device)
    graphs = data.get("cuda_graphs")
    if graphs is not None and not isinstance(graphs, bool):
        raise _bad(path, field_name("cuda_graphs"), "must be true or false", graphs)
    attention = data.get("attention_backend", "torch")
    if attention not in ("torch", "triton"):
        raise _bad(path, field_name("attention_backend"), "must be 'torch' or 'triton'", attention)
    overlap = data.get("async_scheduling", False)
    if not isinstance(overlap, bool):
        raise _bad(path, field_name("async_scheduling"), "must be true or false", overlap)
    quant = data.get("quantization")
    if quant not in (None, "fp8"):
        raise _bad(path, field_name("quantization"), "must be null or 'fp8'", quant)
    fp8_head = data.get("fp8_lm_head", False)
    if not isinstance(fp8_head, bool) or (fp8_head and quant != "fp8"):
        raise _bad(path, field_name("fp8_lm_head"), "must be true (with quantization 'fp8') or false", fp8_head)
    kv = data.get("kv_cache_dtype", "auto")
    if kv not in ("auto", "fp8"):
        raise _bad(path, field_name("kv_cache_dtype"), "must be 'auto' or 'fp8'", kv)
    budget, seqs = data.get("max_num_batched_tokens"), data.get("max_num_seqs")
    return MeasuredFile(path, data["model"], tp, DTYPE_BYTES[dtype.lower().removeprefix("torch.")], rows,
                        pp=pp, ep=ep, cuda_graphs=graphs, attention_backend=attention, async_scheduling=overlap,
                        quantization=quant, fp8_lm_head=fp8_head, kv_fp8=kv == "fp8",
                        max_num_batched_tokens=None if budget is None else _int(budget, path, field_name(
                            "max_num_batched_tokens")),
                        max_num_seqs=None if seqs is None else _int(seqs, path, field_name("max_num_seqs")),
                        data_parallel_size=_int(data.get("data_parallel_size", 1), path,
                                                field_name("data_parallel_size")))


def load_measured(path: str) -> MeasuredFile:
    """Read and validate one bench latency file."""
    return parse_measured(read_json(path, "measured file"), path)


WARM_SHARE = 0.05
"""a bench serve run whose prompt tokens came from the prefix cache more than this is named in a note"""


@dataclass(frozen=True)
class ServeRun:
    """A `shardlm bench serve --json` result: the engine that served it, its requests and percentiles."""

    engine: MeasuredFile
    """The server's engine settings (its /engine, recorded by bench serve; no result rows)."""
    request_rate: float
    requests: list[Request]
    """What was sent: when, the prompt's length, the tokens generated (completed requests)."""
    measured_ms: dict[str, dict[str, float]]
    """{"ttft_ms": {"p50": ..}, "tpot_ms": {..}} as bench serve wrote them."""
    cached_share: float | None = None
    """Of the run's prompt tokens, the share the server's prefix cache held (bench serve's prefix_cache, from
    the server's /metrics); None where not recorded."""
    engine_ttft_ms: float | None = None
    """The engine's own mean TTFT over the run (from a request's arrival in the engine; bench serve's
    engine_ms, from the server's /metrics); None where not recorded."""
    client_ttft_ms: float | None = None
    """The mean TTFT the client measured."""


def parse_serve(data: dict[str, Any], path: str) -> ServeRun:
    """Validate a bench serve result; errors name the file and the field."""
    engine = data.get("engine")
    if not isinstance(engine, dict):
        raise PlanError(f"measured file {path}: a bench serve result without the server's engine settings (field "
                        "'engine'): bench serve records them from a shardlm server's /engine")
    mf = _engine_file(engine, path, (), where="engine.")
    for key, value in (("engine.max_num_seqs", mf.max_num_seqs), ("engine.max_num_batched_tokens",
                                                                  mf.max_num_batched_tokens)):
        if value is None:
            raise PlanError(f"measured file {path}: missing required field {key!r}")
    per = data.get("per_request")
    if not isinstance(per, list) or not per:
        raise _bad(path, "per_request", "must be a non-empty list of the completed requests", per)
    requests = []
    for i, r in enumerate(per):
        where = f"per_request[{i}]"
        if not isinstance(r, dict) or any(k not in r for k in ("sent_s", "prompt", "tokens")):
            raise _bad(path, where, "must be an object with sent_s, prompt and tokens (bench serve since session 14)", r)
        sent = r["sent_s"]
        if not isinstance(sent, (int, float)) or isinstance(sent, bool) or not math.isfinite(sent) or sent < 0:
            raise _bad(path, f"{where}.sent_s", "must be a number of seconds >= 0", sent)
        requests.append(Request(float(sent), _int(r["prompt"], path, f"{where}.prompt"),
                                _int(r["tokens"], path, f"{where}.tokens")))
    measured = {}
    for key in ("ttft_ms", "tpot_ms"):
        got = data.get(key)
        if not isinstance(got, dict):
            raise _bad(path, key, "must be an object of percentiles (p50, p90, p99)", got)
        measured[key] = {f"p{q}": _ms(got.get(f"p{q}"), path, f"{key}.p{q}") for q in PCTS}
    rate = data.get("request_rate", 0.0)
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate < 0:
        raise _bad(path, "request_rate", "must be a number >= 0", rate)
    cached = None
    pc = data.get("prefix_cache")
    if pc is not None:
        if not isinstance(pc, dict) or not all(isinstance(pc.get(k), (int, float)) and not isinstance(pc.get(k), bool)
                                               and pc[k] >= 0 for k in ("query_tokens", "hit_tokens")):
            raise _bad(path, "prefix_cache", "must be an object of query_tokens and hit_tokens >= 0", pc)
        cached = pc["hit_tokens"] / pc["query_tokens"] if pc["query_tokens"] else 0.0
    engine_ttft = None
    if data.get("engine_ms") is not None:
        got = data["engine_ms"]
        engine_ttft = _ms(got.get("ttft_mean") if isinstance(got, dict) else None, path, "engine_ms.ttft_mean")
    client = data["ttft_ms"].get("mean")
    client = float(client) if isinstance(client, (int, float)) and not isinstance(client, bool) else None
    return ServeRun(mf, float(rate), requests, measured, cached, engine_ttft, client)


def model_for_measured(name: str, path: str = "<measured>") -> ModelSpec:
    """The planner's description of the model a measured file names: a preset (bare or random:<preset>; or
    the engine's aliases, e.g. smollm2), a Hugging Face folder / config.json, or a .gguf file."""
    from ..common.model_source import ALIASES

    key = ALIASES.get(name, name)
    try:
        if key.endswith(".gguf"):
            from ..common.model_source import gguf_config

            return from_engine_config(gguf_config(key), key)
        return load_model(key)
    except PlanError as exc:
        raise PlanError(f"measured file {path}: field 'model' {name!r}: {exc}. Pass the model as MODEL "
                        "(a preset or config.json) to use another description") from None
    except (ImportError, OSError, ValueError) as exc:  # gguf missing, unreadable file, bad header
        raise PlanError(f"measured file {path}: field 'model' {name!r} cannot be read here ({exc}); pass the "
                        "model as MODEL (a preset or config.json)") from None


def _err(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas


def predict_row(cm: CostModel, lay: ParallelLayout, row: MeasuredRow, budget: int | None = None
                ) -> tuple[float, float, float, float]:
    """(TTFT s, TPOT s, decode step s, context) predicted for one measured row on the file's layout. A batch
    whose prompts exceed the step budget prefills in C chunks; the sequences of chunk c decode beside the C - c
    chunks after it, each such step taking about a chunk's prefill, and the measured TPOT (each request's
    mean decode step, averaged) carries that share; the decode step (against the median inter-token latency)
    does not."""
    shards = stage_shards(cm.model, lay)
    ttft, _ = cm.prefill_step(lay, shards, row.batch * row.input_len, prompts=row.batch)
    context = row.input_len + row.output_len / 2
    step = tpot = cm.decode_step(lay, shards, row.batch, context)[0]
    chunks = -(-row.batch * row.input_len // budget) if budget else 1
    if chunks > 1 and row.output_len > 1:
        steps = row.output_len - 1
        waits = statistics.mean(min(chunks - c, steps) for c in range(1, chunks + 1))
        tpot += ttft / chunks * waits / steps
    return ttft, tpot, step, context


def validate_files(paths: list[str], gpu: str = "h100-80gb", interconnect: str | None = None,
                   profile: Profile | None = None, model: str | None = None) -> Validation:
    """Predict every row of every measured file and compare. `model` (a preset or config path) replaces
    the files' own model names; interconnect None takes the GPU preset's own (default_interconnect)."""
    if not paths:
        raise PlanError("--validate needs at least one measured file")
    files: list[MeasuredFile | ServeRun] = []
    for p in paths:
        data = read_json(p, "measured file")
        files.append(parse_serve(data, p) if isinstance(data, dict) and "per_request" in data
                     else parse_measured(data, p))
    if interconnect is None:  # resolved here, not per file by make_cluster, so the report names it
        interconnect = default_interconnect(get_gpu(gpu))
    override = load_model(model) if model else None
    notes = [f"model {model!r} used for every file instead of the files' own"] if override else []
    if profile is not None:
        notes.append(f"hardware numbers measured on {profile.device} ({profile.source})")
    rows: list[ValidationRow] = []
    serving: list[ServingRow] = []
    host = "graph-captured"
    timed_notes: dict[str, list[str]] = {}  # note on the timed model layers -> the files it is about
    for f in files:
        mf = f.engine if isinstance(f, ServeRun) else f
        spec = override or model_for_measured(mf.model, mf.path)
        spec = replace(spec, bytes_per_param=mf.bytes_per_param, quantization=mf.quantization,
                       fp8_lm_head=mf.fp8_lm_head)
        lay = mf.layout
        bad = constraint_reasons(spec, lay)
        if bad:
            raise PlanError(f"measured file {mf.path}: layout {lay}: {bad[0]}")
        # predict the engine as it ran: eager or with decode graphs, its attention path, async or not, its
        # weights' and KV cache's formats
        cm = CostModel(spec, make_cluster(gpu, lay.world_size, interconnect), profile, cuda_graphs=mf.cuda_graphs,
                       kv_bytes=1 if mf.kv_fp8 else mf.bytes_per_param, attention_backend=mf.attention_backend,
                       async_scheduling=mf.async_scheduling, max_num_seqs=mf.max_num_seqs or MAX_NUM_SEQS)
        if profile is not None and None not in (mf.cuda_graphs, profile.cuda_graphs) and mf.cuda_graphs != profile.cuda_graphs:
            notes.append(f"{mf.path} ran {'with' if mf.cuda_graphs else 'without'} CUDA graphs, the profile's engine "
                         f"{'with' if profile.cuda_graphs else 'without'}: its measured floors fit the other mode")
        host = "measured" if cm.host_calibrated else "graph-captured"
        timed = model_layers_note(cm, {lay.tp})
        if timed:
            timed_notes.setdefault(timed, []).append(mf.path)
        label = (f"tp={lay.tp} pp={lay.pp} ep={lay.ep}" + (" fp8" if mf.quantization else "")
                 + (" fp8-head" if mf.fp8_lm_head else "")
                 + (" kv-fp8" if mf.kv_fp8 else ""))
        if isinstance(f, ServeRun):
            if f.cached_share is not None and f.cached_share > WARM_SHARE:
                notes.append(f"{mf.path}: {f.cached_share:.0%} of its prompt tokens came from the server's prefix "
                             "cache (prompts an earlier run sent: give each run its own --seed); the simulation "
                             "prefills every prompt cold, so its TTFT is not comparable")
            served = simulate(cm, lay, f.requests, mf.max_num_seqs, mf.max_num_batched_tokens, mf.data_parallel_size,
                              async_scheduling=mf.async_scheduling and lay.pp == 1)
            pred = percentiles_ms(served)
            if f.engine_ttft_ms is not None and f.client_ttft_ms is not None:
                sim = statistics.mean(x.ttft_s for x in served) * 1e3
                sim_engine = statistics.mean(x.engine_ttft_s for x in served) * 1e3
                notes.append(f"{mf.path}: mean TTFT {f.client_ttft_ms:.1f} ms at the client, {sim:.1f} simulated; "
                             f"in the engine (from when its thread took the request in) {f.engine_ttft_ms:.1f} ms, "
                             f"{sim_engine:.1f} simulated ({_err(sim_engine, f.engine_ttft_ms):+.0f}%). The rest, "
                             f"{f.client_ttft_ms - f.engine_ttft_ms:.1f} ms measured against "
                             f"{sim - sim_engine:.1f} simulated, is the wait for the engine's step under way "
                             "(simulated) and HTTP, the server's own work and streaming"
                             + (f" (the probe's serving overhead, {profile.serving_overhead_us / 1e3:.1f} ms)"
                                if profile is not None and profile.serving_overhead_us is not None
                                else " (not simulated: `shardlm probe --serving` measures it)"))
            for key in ("ttft", "tpot"):
                meas = f.measured_ms[f"{key}_ms"]
                serving.append(ServingRow(
                    mf.path, mf.model, label + (f" dp={mf.data_parallel_size}" if mf.data_parallel_size > 1 else ""),
                    f.request_rate, len(f.requests), key, pred[f"{key}_ms"], meas,
                    {q: _err(pred[f"{key}_ms"][q], meas[q]) for q in meas}))
            continue
        for r in mf.rows:
            ttft, tpot, step, ctx = predict_row(cm, lay, r, mf.max_num_batched_tokens)
            rows.append(ValidationRow(
                file=mf.path, model=mf.model, layout=label, tp=mf.tp, gpus=lay.world_size, batch=r.batch,
                input_len=r.input_len, output_len=r.output_len, context=ctx,
                ttft_ms_pred=ttft * 1e3, ttft_ms_meas=r.ttft_ms, ttft_err_pct=_err(ttft * 1e3, r.ttft_ms),
                tpot_ms_pred=tpot * 1e3, tpot_ms_meas=r.tpot_ms, tpot_err_pct=_err(tpot * 1e3, r.tpot_ms),
                tpot_p50_ms_meas=r.tpot_p50_ms, itl_p50_ms_meas=r.itl_p50_ms,
                itl_err_pct=None if r.itl_p50_ms is None else _err(step * 1e3, r.itl_p50_ms)))
    notes += [note if len(about) == len(files) else f"{', '.join(about)}: {note}" for note, about in timed_notes.items()]
    itl_errs = [abs(r.itl_err_pct) for r in rows if r.itl_err_pct is not None]
    return Validation(
        rows=rows,
        median_abs_ttft_err_pct=statistics.median(abs(r.ttft_err_pct) for r in rows) if rows else None,
        median_abs_tpot_err_pct=statistics.median(abs(r.tpot_err_pct) for r in rows) if rows else None,
        median_abs_itl_err_pct=statistics.median(itl_errs) if itl_errs else None,
        gpu=gpu, interconnect=interconnect, hardware_source="profile" if profile else "datasheet",
        host_model=host, notes=notes, recommendations=recommendation_checks(rows), serving=serving)


def recommendation_checks(rows: list[ValidationRow]) -> list[RecommendationCheck]:
    """For every workload (model, batch, prompt and output lengths) measured at two layouts or more (tp, pp,
    ep, FP8 weights or KV), and each objective: is the layout the planner predicts best within
    RECOMMENDATION_TOLERANCE_PCT of the best measured? Latency: the mean decode step (TPOT); throughput:
    decode tokens per second per GPU (batch / TPOT / GPUs). A layout measured twice counts at its median."""
    groups: dict[tuple[str, int, int, int], dict[str, list[ValidationRow]]] = {}
    for r in rows:
        groups.setdefault((r.model, r.batch, r.input_len, r.output_len), {}).setdefault(r.layout, []).append(r)
    out = []
    for (model, batch, inp, outp), by_layout in groups.items():
        if len(by_layout) < 2:
            continue
        pred = {k: statistics.median(r.tpot_ms_pred for r in v) for k, v in by_layout.items()}
        meas = {k: statistics.median(r.tpot_ms_meas for r in v) for k, v in by_layout.items()}
        gpus = {k: v[0].gpus for k, v in by_layout.items()}
        for objective, better in (("latency", lambda t, k: -t[k]), ("throughput", lambda t, k: batch / t[k] / gpus[k])):
            pick = max(pred, key=lambda k: better(pred, k))
            best = max(meas, key=lambda k: better(meas, k))
            shortfall = 100.0 * (better(meas, best) - better(meas, pick)) / abs(better(meas, best))
            out.append(RecommendationCheck(model, batch, inp, outp, objective, len(by_layout), pick, best, shortfall,
                                           shortfall <= RECOMMENDATION_TOLERANCE_PCT))
    return out


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def format_validation(v: Validation) -> str:
    """The comparison as a text table with the medians at the end."""
    host = ("host time measured by the profile" if v.host_model == "measured"
            else "graph-captured host assumptions (no measured host time)")
    lines = [f"validate  predicted on {v.gpu}, {v.interconnect}; {v.hardware_source} hardware numbers, {host}", ""]
    if v.rows:
        head = (f"{'file':<24} {'model':<20} {'layout':<26} {'batch':>5} {'in/out':>9}  "
                f"{'TTFT pred':>9} {'meas':>8} {'err':>7}  {'TPOT pred':>9} {'meas':>8} {'err':>7}  {'ITL p50':>8} "
                f"{'err':>7}")
        lines.append(head)
        for r in v.rows:
            lines.append(f"{_short(r.file, 24):<24} {_short(r.model, 20):<20} {r.layout:<26} {r.batch:>5} "
                         f"{f'{r.input_len}/{r.output_len}':>9}  "
                         f"{r.ttft_ms_pred:>9.1f} {r.ttft_ms_meas:>8.1f} {r.ttft_err_pct:>+6.0f}%  "
                         f"{r.tpot_ms_pred:>9.2f} {r.tpot_ms_meas:>8.2f} {r.tpot_err_pct:>+6.0f}%  "
                         + (f"{r.itl_p50_ms_meas:>8.2f} {r.itl_err_pct:>+6.0f}%" if r.itl_err_pct is not None
                            else f"{'-':>8} {'-':>7}"))
        lines += ["", "times in ms; err = (predicted - measured) / measured; TPOT measured = mean decode step; "
                  "ITL p50 = median inter-token latency (against the predicted decode step: the typical step, without "
                  "chunked prefills)"]
    if v.serving:
        if v.rows:
            lines.append("")
        lines.append("serving (bench serve runs, each request simulated on the cost model: engine/scheduler.py's "
                     "continuous batching)")
        lines.append(f"{'file':<24} {'layout':<26} {'req/s':>6} {'reqs':>5}  {'':<5} "
                     + "  ".join(f"{f'p{q} pred':>9} {'meas':>8} {'err':>6}" for q in PCTS))
        for r in v.serving:
            lines.append(f"{_short(r.file, 24):<24} {r.layout:<26} {r.request_rate:>6.1f} {r.requests:>5}  "
                         f"{r.metric.upper():<5} " + "  ".join(
                             f"{r.pred_ms[f'p{q}']:>9.1f} {r.meas_ms[f'p{q}']:>8.1f} {r.err_pct[f'p{q}']:>+5.0f}%"
                             for q in PCTS))
    lines += [f"note: {n}" for n in v.notes]
    if v.rows:
        itl = "" if v.median_abs_itl_err_pct is None else f", TPOT vs ITL p50 {v.median_abs_itl_err_pct:.1f}%"
        lines.append(f"median |error| over {len(v.rows)} rows: TTFT {v.median_abs_ttft_err_pct:.1f}%, "
                     f"TPOT {v.median_abs_tpot_err_pct:.1f}%{itl}")
    if v.serving:
        errs = {m: statistics.median(abs(e) for r in v.serving if r.metric == m for e in r.err_pct.values())
                for m in ("ttft", "tpot")}
        lines.append(f"median |error| over the serving percentiles (p50/p90/p99 of {len(v.serving) // 2} runs): "
                     f"TTFT {errs['ttft']:.1f}%, TPOT {errs['tpot']:.1f}%")
    if v.recommendations:
        lines += ["", f"recommendation check: the layout the planner predicts best among those measured at a workload, "
                      f"against the best measured (ok within {RECOMMENDATION_TOLERANCE_PCT:.0f}%)",
                  f"{'model':<20} {'batch':>5} {'in/out':>9}  {'objective':<10} {'layouts':>7}  {'recommended':<26} "
                  f"{'best measured':<26} {'short':>6}"]
        for c in v.recommendations:
            lines.append(f"{_short(c.model, 20):<20} {c.batch:>5} {f'{c.input_len}/{c.output_len}':>9}  {c.objective:<10} "
                         f"{c.layouts:>7}  {c.recommended:<26} {c.best:<26} {c.shortfall_pct:>5.1f}%"
                         + ("" if c.ok else "  MISS"))
        ok = sum(c.ok for c in v.recommendations)
        lines.append(f"recommended within {RECOMMENDATION_TOLERANCE_PCT:.0f}% of the best measured in {ok} of "
                     f"{len(v.recommendations)} cases")
    return "\n".join(lines)


def validation_to_dict(v: Validation) -> dict[str, Any]:
    """The comparison as JSON-ready data (same content as the table)."""
    return asdict(v)
