"""Measured cluster profile: load, validate, interpolate. (Past 400 lines: the schema below and its
validation, field by field, are the file format's one definition.)

`shardlm probe` writes this file; `shardlm plan --profile FILE` reads it and uses the measured
numbers instead of datasheet ones. Schema (JSON object, version 1):

    {
      "version": 1,                         optional, int; only 1 is known
      "device": "NVIDIA H100 80GB HBM3",    required, str: what was measured
      "gpu_count": 4,                       optional, int: GPUs on the measured host
      "memory_gib": 79.1,                   optional, number > 0: device memory (total, as the driver
                                            reports it); replaces the --gpu preset's memory
      "hbm_gbps": 3012,                     required, number > 0: device-to-device copy bandwidth,
                                            (read + write bytes) / s, in GB/s (1e9)
      "gemm_tflops": 778,                   required, number > 0: bf16 matmul rate, TFLOP/s (e.g. 8192^3)
      "allreduce": {                        required: group size (string key, >= 2) -> points; {} on a
                                            one-GPU host (collectives then use the --interconnect preset)
          "2": [[16384, 35.3], [1048576, 43.3], ...],
          "4": [[16384, 40.8], ...]         each point [bytes, microseconds]: bytes is the tensor size
      },                                    on each rank (the all-reduce payload), us the time per call
      "allreduce_graph": {"2": [[bytes, us], ...], ...}
                                            optional, same shape: the all-reduce replayed inside a CUDA
                                            graph (no launch cost): what a graph-captured decode step pays
      "all_to_all": {"2": [[bytes, us], ...], ...}
                                            optional, same shape; bytes is each rank's whole send
                                            buffer (including the chunk it keeps)
      "send_recv": [[bytes, us], ...],      optional: one point-to-point send/recv between two GPUs
      "gemv": [[bytes, us], ...],           optional: one [1, in] x [in, out] bf16 GEMM in a CUDA graph
                                            per weight bytes, sizes ascending: decode steps read weights
                                            at the largest point's rate (past the L2 cache; cost.py)
      "gemv_rows": {"8": [[bytes, us], ...], "32": [...], "128": [...]},
                                            optional: the bf16 GEMM of that many rows, per weight bytes, in
                                            a CUDA graph: with "gemv" (one row), a decode step's GEMMs at
                                            its batch, the math included (cost.py decode_read_s)
      "gemv_fp8": {"1": [[bytes, us], ...], "8": [...], "32": [...], "128": [...]},
                                            optional: the engine's FP8 linear path at that many rows, per
                                            FP8 weight bytes, in a CUDA graph (GPUs with FP8 tensor cores):
                                            what an FP8 model's decode GEMMs take
      "gpu_gemv_gbps": {"0": 3845, "1": 1610},
                                            optional: each GPU's start-up GEMV rate (the straggler check,
                                            GPU index -> GB/s); a group's GEMMs run at its slowest GPU's
                                            pace: the planner scales a stage's GPU time by GPU 0's rate
                                            (what the numbers above measured) over the group's slowest
      "stragglers": [1],                    optional, informational: the GPUs the check named
      "allreduce_paths": {"2": {"nccl": [[bytes, us], ...], "one_shot": [...], "two_shot": [...]}},
      "allreduce_limits": {"2": {"one_shot_max_bytes": 524288, "two_shot_max_bytes": 524288}},
                                            optional, informational: each all-reduce path alone in a CUDA
                                            graph, and the limits the engine takes from them (the probe
                                            saves them where the workers read them); "allreduce" and
                                            "allreduce_graph" time the path the engine picks per size
      "step_overhead_us": {"1": 4100, "2": 5200, "4": 7300},
                                            optional: host time of one engine step (batch-1 decode)
                                            outside the decoder layers, per TP group size (key >= 1),
                                            microseconds >= 0. Needs "layer_floor_us".
      "layer_floor_us": {"1": 2200, "2": 2500, "4": 3000},
                                            optional: least time per decoder layer of a decode step at
                                            that TP size, measured on a tiny model (~no GPU work): the
                                            host launching the layer's kernels and its 2 all-reduces
                                            when the engine runs eagerly, the replayed kernels' own
                                            floor with CUDA graphs. Needs "step_overhead_us".
      "prefill_overhead_us": {"1": 9000, ...},
                                            optional: like step_overhead_us, for a step that prefills a
                                            prompt (prompt indexing, the first-token path); without it a
                                            prefill step costs step_overhead_us. Needs the two above.
      "step_overhead_per_seq_us": {"1": 25, ...},
                                            optional: host time each further sequence adds to a decode
                                            step (inputs, sampling, the driver's bookkeeping); without it
                                            0. Needs the two above.
      "eager_layer_floor_us": {"1": 2200, ...},
                                            optional: like layer_floor_us, for a step run eagerly (every
                                            prefill; a decode step no CUDA graph holds); without it
                                            layer_floor_us. Needs the two above.
      "topology": {"interconnect": "nvlink", "raw": "GPU0 GPU1 ..."}
                                            optional, informational: "interconnect" is one of nvlink,
                                            pcie, cpu, unknown; "raw" (optional) the nvidia-smi topo text
      "engine": {"cuda_graphs": true}       optional: whether the measured engine replayed decode steps
                                            as CUDA graphs (then the planner predicts a decode step at
                                            its graph's padded shape, graph_shapes.py); absent: true,
                                            the engine's default on GPU. "attention_backend": "triton"
                                            (the paged attention kernels) or "torch" (gather + SDPA);
                                            absent: "torch", what profiles before the kernels measured
      "serving_overhead_us": 4200.0,        optional (`shardlm probe --serving`): what a served request's
                                            first token waits beyond the engine's own time (HTTP, the
                                            hand-over to the engine thread, streaming, the client), us >= 0:
                                            the serving simulation adds it to TTFT and end-to-end latency
      "model_layers": {                     optional (`shardlm probe --model`): one model's own decoder
                                            layers, timed like the tiny model's at two depths. Needs
                                            "step_overhead_us" and "layer_floor_us".
          "model": "random:llama-3-8b",     informational: what was run (random weights)
          "shape": {"hidden": 4096, "n_heads": 32, "n_kv_heads": 8, "head_dim": 128, "ffn": 14336,
                    "vocab": 128256, "attention_bias": false, "qk_norm": false, "bytes_per_param": 2},
                                            the planner uses these times only for a model of this shape
                                            and weight dtype (the KV cache in that dtype too)
          "decode_context": 32,             mean KV tokens per sequence over the timed decode steps
          "prompt_len": 128,                prompt tokens of the timed first token
          "times_ms": {"1": {"2": {"decode_step": 1.9, "ttft": 6.1}, "8": {...}}, "2": ...}
                                            per TP size, per depth (exactly two depths): the median
                                            batch-1 decode step and the first token's time, ms
          "attention_us": {"1": {"1": [[context, us], ...], "8": [...], ...}, "2": ...}
                                            optional: per TP size, per decode batch, one layer's decode
                                            attention (the engine's kernels on one rank's heads, the KV
                                            in the model dtype) against each sequence's context, us
          "gemm_us": {"1": {"bf16": {"1": 75.0, "8": 80.1, ...}, "fp8": {...}}, "2": ...}
                                            optional: per TP size, per weight format, per rows, one dense
                                            layer's four GEMMs (qkv, o, gate_up, down: this model's own
                                            shapes on one rank) streamed past the L2 cache in a CUDA graph,
                                            us: a decode step (or a prefill no longer than the most rows)
                                            takes this instead of the weight-size curves
          "graph_us": {"1": {"2": {"1": 900.0, "8": 950.0, ...}, "8": {...}}, "2": ...}
                                            optional: per TP size, per depth (the two of times_ms), per
                                            decode batch, the engine's own decode CUDA graph replayed back
                                            to back (GPU time: every layer's kernels and collectives, the
                                            LM head; attention over one key; no host work, no sampler), us:
                                            what a graph-replayed layer holds beyond the formulas is then
                                            found per batch, not at batch 1 alone
          "graph_us_fp8": {...}             optional: as graph_us, the same model with FP8 weights (the KV
                                            cache and the LM head in the model dtype): an FP8 layer's
                                            correction comes from these
          "attention_us_fp8": {...}         optional: as attention_us, the KV in FP8 (e4m3): a model
                                            with an FP8 KV cache takes its decode attention from these
      }
    }

Every list needs at least one point; points are sorted by bytes on load. Times are interpolated
linearly in bytes between points (exact for an alpha + bytes/bandwidth curve), held at the first
point's time below it (latency floor) and extrapolated along the last segment above it (bandwidth).
Group sizes between measured ones are interpolated linearly; above the largest the bytes are
scaled by the ring factor 2(n-1)/n. The measured numbers describe one node's fabric; a group that
spans nodes still takes its inter-node step from the --network preset.

Host calibration. With "step_overhead_us" and "layer_floor_us" the cost model treats the engine as
what it measured: kernel launch is asynchronous, so per layer the host's launch time and the GPU's
work overlap and the slower wins. One stage's step (decode or prefill) is

    step_overhead_us[tp] + sum over layers of max(layer_floor_us[tp], layer GPU time + its collectives)
    + the stage's non-layer GPU work (embedding all-reduce, LM head, logits all-gather)

(the sampler waits for the logits, so that last term does not hide under host time; its host cost is
in step_overhead_us); a prefill step takes prefill_overhead_us[tp] instead of step_overhead_us[tp] where
the profile has it, and a step run eagerly eager_layer_floor_us[tp] instead of layer_floor_us[tp]. Without the two fields the model assumes graph-captured decode (cost.Efficiency:
a 15 us layer floor, 500 us per step). TP sizes that were not measured: between two measured sizes,
linear in log2(tp); below the smallest, the smallest's value; above the largest, the last segment is
extended linearly in log2(tp) (launch skew grows with the ranks), never below the largest's value;
with one measured size, that value.

Model layers. The tiny model's floor stands for every model's non-GEMM kernels, but those grow with
the layer's width (a 4096-wide norm or a 128-wide head's attention runs longer than a 256-wide one):
on Llama-3-8B they took ~35 us a layer more than the tiny layer (docs/PERFORMANCE.md, session 7).
With "model_layers" the planner, for a model of that shape at a measured TP size, fits the same
line through the two depths (per-layer time, time at zero layers) and uses the part its own formulas
do not explain: per layer the measured time less the predicted GPU work and collectives of a layer
at the timed shape (graph mode: what adds to every layer; eager: the layer's floor), per step the
zero-layer time less the predicted non-layer work (cost.py, `CostModel.calibrated`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import PlanError, read_json
from .models import LAYER_SHAPE_KEYS


@dataclass(frozen=True)
class Curve:
    """Measured time of one collective against message size."""

    points: tuple[tuple[float, float], ...]
    """(bytes, microseconds), sorted by bytes, at least one."""

    def time_us(self, nbytes: float) -> float:
        pts = self.points
        if nbytes <= pts[0][0]:
            return pts[0][1]
        if len(pts) == 1:
            return pts[0][1] * nbytes / pts[0][0]  # beyond the only point: pure bandwidth
        for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
            if nbytes <= b1:
                return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
        (b0, t0), (b1, t1) = pts[-2], pts[-1]
        slope = max(0.0, (t1 - t0) / (b1 - b0))
        return t1 + slope * (nbytes - b1)


def _ring(n: int) -> float:
    return 2 * (n - 1) / n


@dataclass(frozen=True)
class CollectiveTable:
    """Curves per group size for one collective."""

    curves: dict[int, Curve]
    """Group size -> curve."""

    def time_us(self, n: int, nbytes: float) -> float:
        sizes = sorted(self.curves)
        if n in self.curves:
            return self.curves[n].time_us(nbytes)
        if n < sizes[0]:
            return self.curves[sizes[0]].time_us(nbytes)
        if n > sizes[-1]:
            top = sizes[-1]
            return self.curves[top].time_us(nbytes * _ring(n) / _ring(top))
        lo = max(s for s in sizes if s < n)
        hi = min(s for s in sizes if s > n)
        t_lo, t_hi = self.curves[lo].time_us(nbytes), self.curves[hi].time_us(nbytes)
        return t_lo + (t_hi - t_lo) * (n - lo) / (hi - lo)


@dataclass(frozen=True)
class HostTable:
    """Host time measured per TP group size (microseconds), interpolated in log2(tp)."""

    values: dict[int, float]
    """TP group size (>= 1) -> microseconds (>= 0); at least one entry."""

    def at(self, tp: int) -> float:
        """Microseconds at `tp` (see the module docstring for sizes that were not measured)."""
        v, sizes = self.values, sorted(self.values)
        if tp in v:
            return v[tp]
        if tp < sizes[0] or len(sizes) == 1:
            return v[sizes[0]] if tp < sizes[0] else v[sizes[-1]]
        if tp > sizes[-1]:
            lo, hi = sizes[-2], sizes[-1]
            slope = (v[hi] - v[lo]) / (math.log2(hi) - math.log2(lo))
            return max(v[hi], v[hi] + slope * (math.log2(tp) - math.log2(hi)))
        lo = max(s for s in sizes if s < tp)
        hi = min(s for s in sizes if s > tp)
        x = (math.log2(tp) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
        return v[lo] + (v[hi] - v[lo]) * x


TOPOLOGIES = ("nvlink", "pcie", "cpu", "unknown")


@dataclass(frozen=True)
class LayerLine:
    """Step time against decoder depth, fitted through two measured depths."""

    per_layer_us: float
    """Slope: what each further layer adds (>= 0)."""
    zero_layers_us: float
    """Intercept: the step with no layers (>= 0)."""

    @classmethod
    def through(cls, d1: int, t1_us: float, d2: int, t2_us: float) -> "LayerLine":
        """The line through (d1 layers, t1) and (d2, t2). A noisy pair can tilt it down: then the slope is 0
        and all of it is the step's; an intercept below 0 is held at 0."""
        slope = max(0.0, (t2_us - t1_us) / (d2 - d1))
        return cls(slope, max(0.0, t1_us - d1 * slope))


@dataclass(frozen=True)
class ModelLayers:
    """One model's decoder layers timed by the probe (`shardlm probe --model`)."""

    model: str
    """What was run (informational)."""
    shape: tuple[tuple[str, Any], ...]
    """(LAYER_SHAPE_KEYS field, value) pairs: the shape these times hold for."""
    decode_context: float
    """Mean KV tokens per sequence of the timed decode steps."""
    prompt_len: int
    """Prompt tokens of the timed first token."""
    decode: dict[int, LayerLine]
    """TP size -> batch-1 decode step line."""
    prefill: dict[int, LayerLine]
    """TP size -> first-token (prefill step) line."""
    attention: dict[int, dict[int, Curve]] | None = None
    """TP size -> decode batch -> one layer's decode attention time against context, if measured."""
    gemms: dict[int, dict[str, dict[int, float]]] | None = None
    """TP size -> "bf16" / "fp8" -> rows -> one dense layer's four GEMMs, us, if measured."""
    graphs: dict[int, dict[int, LayerLine]] | None = None
    """TP size -> decode batch -> the engine's decode graph replayed alone (GPU time, attention over one key)
    against depth, if measured."""
    graphs_fp8: dict[int, dict[int, LayerLine]] | None = None
    """As graphs, the model with FP8 weights, if measured."""
    attention_fp8: dict[int, dict[int, Curve]] | None = None
    """As attention, with an FP8 KV cache, if measured."""

    def gemm_us(self, tp: int, rows: float, fp8: bool) -> float | None:
        """One dense layer's four GEMMs at `tp` over `rows` rows as timed, in FP8 or the model dtype: linear
        between the measured rows (fewer than the fewest: theirs); None past the most, at an untimed TP size
        or format."""
        times = ((self.gemms or {}).get(tp) or {}).get("fp8" if fp8 else "bf16")
        if not times or rows > max(times):
            return None
        lo, hi, frac = around(times, rows)
        return times[lo] + (times[hi] - times[lo]) * frac

    def attention_us(self, tp: int, batch: float, context: float, fp8: bool = False) -> float | None:
        """One layer's decode attention at `tp` for `batch` sequences of `context` tokens, the KV cache in the
        model dtype or FP8: each measured batch's curve at the context, interpolated linearly between the
        measured batches (fewer than the fewest: theirs; more than the most: theirs scaled by the batch); None
        where not measured at tp."""
        curves = ((self.attention_fp8 if fp8 else self.attention) or {}).get(tp)
        if not curves:
            return None
        most = max(curves)
        return curves_at(curves, batch, context) * (batch / most if batch > most else 1.0)


def around(measured: dict[int, Any], key: float) -> tuple[int, int, float]:
    """The measured keys (rows, a batch) around `key` and how far key lies from the lower to the upper (0..1;
    below the smallest: the smallest alone, above the largest: the largest alone)."""
    keys = sorted(measured)
    hi = next((k for k in keys if k >= key), keys[-1])
    lo = max((k for k in keys if k <= key), default=hi)
    return lo, hi, 0.0 if hi == lo else (key - lo) / (hi - lo)


def curves_at(curves: dict[int, Curve], key: float, x: float) -> float:
    """Curves measured at some keys (rows, a batch): their time at x, interpolated linearly between the two
    measured keys around `key` (below the smallest: its curve; above the largest: its curve)."""
    lo, hi, frac = around(curves, key)
    t = curves[lo].time_us(x)
    return t + (curves[hi].time_us(x) - t) * frac if frac else t


@dataclass(frozen=True)
class Profile:
    """Numbers measured on the real cluster."""

    device: str
    """What was measured (GPU name)."""
    hbm_gbps: float
    """Measured device-memory copy bandwidth, GB/s."""
    gemm_tflops: float
    """Measured bf16 GEMM rate, TFLOP/s."""
    allreduce: CollectiveTable | None
    """All-reduce time per group size and message size; None when the profile measured no group ({})."""
    allreduce_graph: CollectiveTable | None = None
    """All-reduce time inside a CUDA graph, if measured."""
    all_to_all: CollectiveTable | None = None
    """All-to-all time, if measured."""
    send_recv: Curve | None = None
    """Point-to-point time, if measured."""
    gemv: Curve | None = None
    """One-row GEMM time per weight bytes, in a CUDA graph, if measured."""
    gemv_rows: dict[int, Curve] | None = None
    """The bf16 GEMM's time per weight bytes at more rows than one, by rows, if measured."""
    gemv_fp8: dict[int, Curve] | None = None
    """The FP8 linear path's time per FP8 weight bytes, by rows, if measured."""
    memory_gib: float | None = None
    """Device memory, if measured."""
    gpu_count: int | None = None
    """GPUs on the measured host."""
    step_overhead: HostTable | None = None
    """Host time of one engine step outside the layers, per TP size (us), if measured."""
    layer_floor: HostTable | None = None
    """Host time per decoder layer per step, per TP size (us), if measured."""
    prefill_overhead: HostTable | None = None
    """Host time of a prefill step outside the layers, per TP size (us), if measured (else step_overhead's)."""
    step_overhead_per_seq: HostTable | None = None
    """Host time each further sequence adds to a decode step, per TP size (us), if measured."""
    eager_layer_floor: HostTable | None = None
    """Least time per decoder layer of a step run eagerly, per TP size (us), if measured (else layer_floor's)."""
    topology: str | None = None
    """Measured link between the GPUs: nvlink, pcie, cpu or unknown (informational)."""
    topology_raw: str | None = None
    """The probe's raw topology text (informational)."""
    cuda_graphs: bool | None = None
    """Whether the measured engine replayed decode steps as CUDA graphs (None: not said)."""
    attention_backend: str = "torch"
    """The measured engine's attention path: 'triton' (the kernels) or 'torch' (gather + SDPA; what a
    profile that does not say was measured with)."""
    model_layers: ModelLayers | None = None
    """One model's own layers timed at two depths, if measured."""
    gpu_gemv_gbps: dict[int, float] | None = None
    """Each GPU's start-up GEMV rate (GPU index -> GB/s), if measured."""
    serving_overhead_us: float | None = None
    """What a served request's first token waits beyond the engine (us), if measured."""
    source: str = "<profile>"
    """Where the profile came from."""

    def slowdown(self, gpus: list[int]) -> float:
        """How much longer a group on these GPUs takes over its GEMMs than GPU 0 (which the profile's rates
        describe): its slowest measured GPU sets the pace. 1.0 when not measured."""
        rates = self.gpu_gemv_gbps or {}
        known = [rates[g] for g in gpus if g in rates]
        return max(1.0, rates[0] / min(known)) if known and 0 in rates else 1.0

    def decode_gemm_curves(self, fp8: bool) -> dict[int, Curve]:
        """The measured GEMM curves by rows for weights in FP8 (gemv_fp8) or in the model dtype (gemv at one
        row, gemv_rows above); {} where none was measured."""
        if fp8 and self.gemv_fp8:
            return self.gemv_fp8
        return {**({1: self.gemv} if self.gemv is not None else {}), **(self.gemv_rows or {})}

    @property
    def host_calibrated(self) -> bool:
        """The profile carries measured host time (step overhead and layer floor)."""
        return self.step_overhead is not None and self.layer_floor is not None


def _bad(source: str, where: str, what: str, got: Any) -> PlanError:
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return PlanError(f"{source}: field {where!r} {what}, got {shown}")


def _positive(value: Any, source: str, where: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise _bad(source, where, "must be a positive number", value)
    return float(value)


def _gpu_rates(value: Any, source: str) -> dict[int, float]:
    if not isinstance(value, dict) or not value:
        raise _bad(source, "gpu_gemv_gbps", "must be a non-empty object: GPU index -> GB/s", value)
    out = {}
    for key, rate in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise _bad(source, f"gpu_gemv_gbps.{key}", "must be keyed by a GPU index (0, 1, ...)", key)
        out[int(key)] = _positive(rate, source, f"gpu_gemv_gbps.{key}")
    return out


def _positive_int(value: Any, source: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad(source, where, "must be a positive integer", value)
    return value


def _curve(points: Any, source: str, where: str) -> Curve:
    if not isinstance(points, list) or not points:
        raise _bad(source, where, "must be a non-empty list of [bytes, microseconds] pairs", points)
    out = []
    for i, pt in enumerate(points):
        if not isinstance(pt, (list, tuple)) or len(pt) != 2:
            raise _bad(source, f"{where}[{i}]", "must be a [bytes, microseconds] pair", pt)
        out.append((_positive(pt[0], source, f"{where}[{i}][0]"), _positive(pt[1], source, f"{where}[{i}][1]")))
    out.sort()
    if len({b for b, _ in out}) != len(out):
        raise _bad(source, where, "has two points with the same byte size", points)
    return Curve(tuple(out))


def _curves_by_rows(value: Any, source: str, where: str) -> dict[int, Curve]:
    if not isinstance(value, dict) or not value:
        raise _bad(source, where, 'must be a non-empty object mapping rows ("1", "8", ...) to points', value)
    return {_size_key(k, 1, "a row count", source, where): _curve(v, source, f"{where}.{k}") for k, v in value.items()}


def _size_key(key: Any, minimum: int, what: str, source: str, where: str) -> int:
    """A table key that names a group size ("2", "4", ...), at least `minimum`."""
    try:
        n = int(key)
    except (TypeError, ValueError):
        n = 0
    if n < minimum or str(n) != str(key).strip():
        raise _bad(source, f"{where}.{key}", f"must be keyed by a {what} >= {minimum}", key)
    return n


def _table(value: Any, source: str, where: str) -> CollectiveTable | None:
    if value == {}:
        return None  # a one-GPU host has no group to measure
    if not isinstance(value, dict):
        raise _bad(source, where, 'must be an object mapping group size ("2", "4", ...) to points', value)
    curves = {}
    for key, points in value.items():
        n = _size_key(key, 2, "group size", source, where)
        curves[n] = _curve(points, source, f"{where}.{key}")
    return CollectiveTable(curves)


def _host_table(value: Any, source: str, where: str) -> HostTable:
    if not isinstance(value, dict) or not value:
        raise _bad(source, where, 'must be an object mapping TP size ("1", "2", "4", ...) to microseconds', value)
    out = {}
    for key, us in value.items():
        n = _size_key(key, 1, "TP size", source, where)
        ok = isinstance(us, (int, float)) and not isinstance(us, bool) and math.isfinite(us) and us >= 0
        if not ok:
            raise _bad(source, f"{where}.{key}", "must be a number of microseconds >= 0", us)
        out[n] = float(us)
    return HostTable(out)


def _host_fields(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The optional host-calibration and informational fields, validated."""
    out: dict[str, Any] = {}
    have = [k for k in ("step_overhead_us", "layer_floor_us") if k in data]
    if len(have) == 1:
        other = "layer_floor_us" if have[0] == "step_overhead_us" else "step_overhead_us"
        raise PlanError(f"{source}: field {have[0]!r} needs {other!r} too (the host model uses both); "
                        f"add it or remove {have[0]!r}")
    if have:
        out["step_overhead"] = _host_table(data["step_overhead_us"], source, "step_overhead_us")
        out["layer_floor"] = _host_table(data["layer_floor_us"], source, "layer_floor_us")
    for key in ("prefill_overhead_us", "eager_layer_floor_us", "step_overhead_per_seq_us"):
        if key in data:
            if not have:
                raise PlanError(f"{source}: field {key!r} needs 'step_overhead_us' and 'layer_floor_us' too (the "
                                f"host model uses them); add them or remove {key!r}")
            out[key.removesuffix("_us")] = _host_table(data[key], source, key)
    if "topology" in data:
        topo = data["topology"]
        if not isinstance(topo, dict):
            raise _bad(source, "topology", 'must be an object {"interconnect": ..., "raw": ...}', topo)
        if topo.get("interconnect") not in TOPOLOGIES:
            raise _bad(source, "topology.interconnect", f"must be one of {', '.join(TOPOLOGIES)}",
                       topo.get("interconnect"))
        if "raw" in topo and not isinstance(topo["raw"], str):
            raise _bad(source, "topology.raw", "must be a string", topo["raw"])
        out["topology"], out["topology_raw"] = topo["interconnect"], topo.get("raw")
    if "engine" in data:
        eng = data["engine"]
        if not isinstance(eng, dict):
            raise _bad(source, "engine", 'must be an object such as {"cuda_graphs": true}', eng)
        if "cuda_graphs" in eng and not isinstance(eng["cuda_graphs"], bool):
            raise _bad(source, "engine.cuda_graphs", "must be true or false", eng["cuda_graphs"])
        out["cuda_graphs"] = eng.get("cuda_graphs")
        if eng.get("attention_backend", "torch") not in ("torch", "triton"):
            raise _bad(source, "engine.attention_backend", "must be 'torch' or 'triton'", eng["attention_backend"])
        out["attention_backend"] = eng.get("attention_backend", "torch")
    if "model_layers" in data:
        if not have:
            raise PlanError(f"{source}: field 'model_layers' needs 'step_overhead_us' and 'layer_floor_us' too (the "
                            f"host model uses them); add them or remove 'model_layers'")
        out["model_layers"] = _model_layers(data["model_layers"], source)
    return out


def _number(value: Any, source: str, where: str, what: str = "must be a number >= 0") -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e12):
        raise _bad(source, where, what, value)
    return float(value)


def _model_layers(value: Any, source: str) -> ModelLayers:
    where = "model_layers"
    if not isinstance(value, dict):
        raise _bad(source, where, "must be an object (what `shardlm probe --model` writes)", value)
    for key in ("model", "shape", "decode_context", "prompt_len", "times_ms"):
        if key not in value:
            raise PlanError(f"{source}: field {where!r} is missing {key!r}")
    shape = value["shape"]
    if not isinstance(shape, dict) or set(shape) != set(LAYER_SHAPE_KEYS):
        raise _bad(source, f"{where}.shape", f"must be an object with exactly {', '.join(LAYER_SHAPE_KEYS)}", shape)
    for key, got in shape.items():
        if key not in ("attention_bias", "qk_norm"):
            _positive_int(got, source, f"{where}.shape.{key}")
        elif not isinstance(got, bool):
            raise _bad(source, f"{where}.shape.{key}", "must be true or false", got)
    prompt_len = _positive_int(value["prompt_len"], source, f"{where}.prompt_len")
    times = value["times_ms"]
    if not isinstance(times, dict) or not times:
        raise _bad(source, f"{where}.times_ms", 'must map TP size ("1", "2", ...) to {depth: times}', times)
    lines: dict[str, dict[int, LayerLine]] = {"decode_step": {}, "ttft": {}}
    for key, depths in times.items():
        tp = _size_key(key, 1, "TP size", source, f"{where}.times_ms")
        at = f"{where}.times_ms.{key}"
        if tp in lines["decode_step"]:
            raise _bad(source, at, "names a TP size twice", key)
        if not isinstance(depths, dict) or len(depths) != 2:
            raise _bad(source, at, "must map exactly two depths (layer counts) to their times", depths)
        points = {}
        for d, t in depths.items():
            layers = _size_key(d, 1, "layer count", source, at)
            if layers in points:
                raise _bad(source, f"{at}.{d}", "names a depth twice; give two different layer counts", d)
            if not isinstance(t, dict):
                raise _bad(source, f"{at}.{d}", 'must be an object {"decode_step": ms, "ttft": ms}', t)
            points[layers] = t
        for kind, fitted in lines.items():
            (d1, t1), (d2, t2) = [(d, _number(points[d].get(kind), source, f"{at}.{d}.{kind}",
                                              "must be a time in ms >= 0") * 1e3) for d in sorted(points)]
            fitted[tp] = LayerLine.through(d1, t1, d2, t2)
    attention, attention_fp8 = (_attention_curves(value[key], source, f"{where}.{key}") if key in value else None
                                for key in ("attention_us", "attention_us_fp8"))
    gemms = None
    if "gemm_us" in value:
        gemms = _layer_gemms(value["gemm_us"], source, f"{where}.gemm_us")
    graphs, graphs_fp8 = (_graph_lines(value[key], source, f"{where}.{key}") if key in value else None
                          for key in ("graph_us", "graph_us_fp8"))
    return ModelLayers(model=str(value["model"]), shape=tuple((k, shape[k]) for k in LAYER_SHAPE_KEYS),
                       decode_context=_number(value["decode_context"], source, f"{where}.decode_context"),
                       prompt_len=prompt_len, decode=lines["decode_step"], prefill=lines["ttft"],
                       attention=attention, gemms=gemms, graphs=graphs, graphs_fp8=graphs_fp8,
                       attention_fp8=attention_fp8)


def _attention_curves(value: Any, source: str, where: str) -> dict[int, dict[int, Curve]]:
    """model_layers.attention_us (or attention_us_fp8): {TP size: {batch: [[context, us], ...]}}"""
    if not isinstance(value, dict):
        raise _bad(source, where, 'must map TP size ("1", "2", ...) to {batch: [[context, us], ...]}', value)
    return {_size_key(tp, 1, "TP size", source, where): _curves_by_rows(curves, source, f"{where}.{tp}")
            for tp, curves in value.items()}


def _graph_lines(value: Any, source: str, where: str) -> dict[int, dict[int, LayerLine]]:
    """model_layers.graph_us (or graph_us_fp8): {TP size: {depth: {batch: us > 0}}}, exactly two depths with
    the same batches: per TP size and batch, the line through the two depths"""
    if not isinstance(value, dict):
        raise _bad(source, where, 'must map TP size ("1", "2", ...) to {depth: {batch: us}}', value)
    out: dict[int, dict[int, LayerLine]] = {}
    for tp_key, depths in value.items():
        tp = _size_key(tp_key, 1, "TP size", source, where)
        at = f"{where}.{tp_key}"
        if tp in out:
            raise _bad(source, at, "names a TP size twice", tp_key)
        if not isinstance(depths, dict) or len(depths) != 2:
            raise _bad(source, at, "must map exactly two depths (layer counts) to {batch: us}", depths)
        points: dict[int, dict[int, float]] = {}
        for d, times in depths.items():
            layers = _size_key(d, 1, "layer count", source, at)
            if layers in points:
                raise _bad(source, f"{at}.{d}", "names a depth twice; give two different layer counts", d)
            if not isinstance(times, dict) or not times:
                raise _bad(source, f"{at}.{d}", "must map decode batches (1, 8, ...) to a step's time, us", times)
            points[layers] = {}
            for b, us in times.items():
                batch = _size_key(b, 1, "batch", source, f"{at}.{d}")
                if batch in points[layers]:
                    raise _bad(source, f"{at}.{d}.{b}", "names a batch twice", b)
                points[layers][batch] = _positive(us, source, f"{at}.{d}.{b}")
        (d1, t1), (d2, t2) = sorted(points.items())
        if set(t1) != set(t2):
            raise _bad(source, at, "must time the same batches at both depths", depths)
        out[tp] = {b: LayerLine.through(d1, t1[b], d2, t2[b]) for b in t1}
    return out


def _layer_gemms(value: Any, source: str, where: str) -> dict[int, dict[str, dict[int, float]]]:
    """model_layers.gemm_us: {TP size: {"bf16" | "fp8": {rows: us > 0}}}"""
    if not isinstance(value, dict):
        raise _bad(source, where, 'must map TP size ("1", "2", ...) to {"bf16": {rows: us}, "fp8": ...}', value)
    out: dict[int, dict[str, dict[int, float]]] = {}
    for tp_key, formats in value.items():
        tp = _size_key(tp_key, 1, "TP size", source, where)
        at = f"{where}.{tp_key}"
        if not isinstance(formats, dict) or not formats or not set(formats) <= {"bf16", "fp8"}:
            raise _bad(source, at, 'must be an object with "bf16" and/or "fp8": {rows: us}', formats)
        out[tp] = {}
        for fmt, times in formats.items():
            if not isinstance(times, dict) or not times:
                raise _bad(source, f"{at}.{fmt}", "must map rows (1, 8, ...) to one layer's GEMM time, us", times)
            out[tp][fmt] = {_size_key(rows, 1, "row count", source, f"{at}.{fmt}"):
                            _positive(us, source, f"{at}.{fmt}.{rows}") for rows, us in times.items()}
    return out


def parse_profile(data: Any, source: str = "<profile>") -> Profile:
    """Validate a profile dict; errors name the offending field."""
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a profile must be a JSON object, got {type(data).__name__}")
    version = data.get("version", 1)
    if version != 1:
        raise _bad(source, "version", "must be 1 (the only schema this planner knows)", version)
    for key in ("device", "hbm_gbps", "gemm_tflops", "allreduce"):
        if key not in data:
            raise PlanError(f"{source}: missing required field {key!r}")
    if not isinstance(data["device"], str) or not data["device"].strip():
        raise _bad(source, "device", "must be a non-empty string", data["device"])
    gpu_count = data.get("gpu_count")
    if gpu_count is not None:
        _positive_int(gpu_count, source, "gpu_count")
    return Profile(
        device=data["device"],
        hbm_gbps=_positive(data["hbm_gbps"], source, "hbm_gbps"),
        gemm_tflops=_positive(data["gemm_tflops"], source, "gemm_tflops"),
        allreduce=_table(data["allreduce"], source, "allreduce"),
        allreduce_graph=_table(data["allreduce_graph"], source, "allreduce_graph") if "allreduce_graph" in data else None,
        all_to_all=_table(data["all_to_all"], source, "all_to_all") if "all_to_all" in data else None,
        send_recv=_curve(data["send_recv"], source, "send_recv") if "send_recv" in data else None,
        gemv=_curve(data["gemv"], source, "gemv") if "gemv" in data else None,
        gemv_rows=_curves_by_rows(data["gemv_rows"], source, "gemv_rows") if "gemv_rows" in data else None,
        gemv_fp8=_curves_by_rows(data["gemv_fp8"], source, "gemv_fp8") if "gemv_fp8" in data else None,
        memory_gib=_positive(data["memory_gib"], source, "memory_gib") if "memory_gib" in data else None,
        gpu_count=gpu_count,
        gpu_gemv_gbps=_gpu_rates(data["gpu_gemv_gbps"], source) if "gpu_gemv_gbps" in data else None,
        serving_overhead_us=(_number(data["serving_overhead_us"], source, "serving_overhead_us")
                             if "serving_overhead_us" in data else None),
        source=source,
        **_host_fields(data, source),
    )


def load_profile(path_or_data: str | dict[str, Any]) -> Profile:
    """Read and validate a profile from a JSON file path (or an already-parsed dict)."""
    if isinstance(path_or_data, dict):
        return parse_profile(path_or_data)
    return parse_profile(read_json(path_or_data, "profile"), path_or_data)
