"""`shardlm plan`: the planner's command line.

    shardlm plan MODEL --gpus N [--gpu h100-80gb] [--interconnect nvlink|pcie|pcie-cross-socket]
                 [--gpus-per-node N] [--network ib-ndr|ib-hdr|eth-400g|eth-100g]
                 [--max-model-len 8192] [--input-len N] [--output-len N] [--max-num-seqs 256]
                 [--kv-dtype bf16|fp8] [--quantization fp8 [--fp8-lm-head]] [--allow-fp8]
                 [--slo-tpot-ms X] [--slo-ttft-ms X] [--profile probe.json]
                 [--json] [--plot out.png]
    shardlm plan --validate measured.json [more.json ...] [MODEL] [--gpu ...] [--interconnect ...]
                 [--profile probe.json] [--json]

Exit status: 0 with a recommendation, 1 when no layout meets the SLO, 2 on bad input; the same when the
reader of stdout stops early (`| head`), which ends the output quietly.
With --validate: compare predicted TTFT/TPOT with `shardlm bench latency --json` files (validate.py);
MODEL may be omitted (each file names its model; MODEL, if given, replaces it) and --gpus is not used
(each file's tensor_parallel_size is the layout). Exit status 0, or 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from ..common.presets import PRESETS
from . import PlanError
from .hardware import GPUS, INTERCONNECTS, NETWORKS, default_interconnect, make_cluster
from .models import load_model
from .plan import Workload, make_plan
from .profile import load_profile
from .report import format_table, plan_to_dict, plot_plan
from .validate import format_validation, validate_files, validation_to_dict


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "plan", help="predict memory, latency and throughput of every TP/PP/EP/DP layout and recommend one",
        description="Predict weights and KV per GPU, TTFT, TPOT and throughput of every (TP, PP, EP, DP) "
                    "layout of a model on a cluster, say why layouts are rejected, and recommend one.")
    p.add_argument("model", nargs="?", default=None,
                   help=f"preset ({', '.join(sorted(PRESETS))}; each also as random:<name>) or a Hugging Face "
                        "config.json / folder; optional with --validate")
    p.add_argument("--gpus", type=int, default=None, help="GPUs in total (required unless --validate)")
    p.add_argument("--gpu", default="h100-80gb", help=f"GPU preset ({', '.join(GPUS)}); default h100-80gb")
    no_nvlink = [name for name, spec in GPUS.items() if default_interconnect(spec) != "nvlink"]
    p.add_argument("--interconnect", default=None, choices=list(INTERCONNECTS),
                   help="link between the GPUs of a node; default: from the GPU preset (nvlink, or pcie for "
                        f"the GPUs without NVLink: {', '.join(no_nvlink)})")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: all on one node)")
    p.add_argument("--network", default="ib-ndr", choices=list(NETWORKS),
                   help="network between nodes when --gpus > --gpus-per-node; default ib-ndr")
    p.add_argument("--max-model-len", type=int, default=Workload.max_model_len,
                   help=f"longest sequence served; default {Workload.max_model_len}")
    p.add_argument("--input-len", type=int, default=0, help="prompt tokens per request (default: half)")
    p.add_argument("--output-len", type=int, default=0, help="output tokens per request (default: the rest)")
    p.add_argument("--max-num-seqs", type=int, default=Workload.max_num_seqs,
                   help=f"most sequences per replica; default {Workload.max_num_seqs}")
    p.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8"], help="KV cache element type")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="the weights as the engine's quantization='fp8' serves them (decoder linear layers in FP8); "
                        "default: the checkpoint's own format (bf16 unless its config says FP8)")
    p.add_argument("--fp8-lm-head", action="store_true",
                   help="with --quantization fp8: the LM head in FP8 too, as the engine's fp8_lm_head runs it")
    p.add_argument("--allow-fp8", action="store_true",
                   help="also plan every layout with FP8 weights (rows marked fp8) and recommend among both")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="time-per-output-token target, ms")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="time-to-first-token target, ms")
    p.add_argument("--profile", default=None, help="measured profile JSON (from `shardlm probe`)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.add_argument("--plot", default=None, metavar="PNG", help="write TPOT vs throughput of the layouts here")
    p.add_argument("--validate", nargs="+", default=None, metavar="MEASURED_JSON",
                   help="compare predicted TTFT/TPOT with `shardlm bench latency --json` files instead of planning")
    p.set_defaults(func=run_plan)
    return p


def _print_out(text: str) -> None:
    """Print to stdout. A reader that stopped early (`shardlm plan --json | head -1`) ends the output
    quietly instead of with a BrokenPipeError traceback."""
    try:
        print(text)
        sys.stdout.flush()  # inside the try: a write that only fails at the flush fails here too
    except BrokenPipeError:
        # The interpreter flushes stdout once more at exit, which would fail again (and print "Exception
        # ignored ... BrokenPipeError"): point the descriptor at /dev/null so that flush succeeds.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def run_validate(args: argparse.Namespace) -> int:
    """--validate: print predicted vs measured TTFT/TPOT (table or JSON). Returns the exit status."""
    try:
        profile = load_profile(args.profile) if args.profile else None
        result = validate_files(args.validate, args.gpu, args.interconnect, profile, args.model)
    except PlanError as exc:
        print(f"shardlm plan: error: {exc}", file=sys.stderr)
        return 2
    _print_out(json.dumps(validation_to_dict(result), indent=2) if args.json else format_validation(result))
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """Run the planner for parsed arguments; print the table (or JSON). Returns the exit status."""
    if getattr(args, "validate", None):
        return run_validate(args)
    missing = [flag for flag, v in (("MODEL", args.model), ("--gpus", args.gpus)) if v is None]
    if missing:
        print(f"shardlm plan: error: {' and '.join(missing)} required (or --validate FILE ...)", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model)
        if args.quantization is not None or args.fp8_lm_head:
            model = replace(model, quantization=args.quantization or model.quantization, fp8_lm_head=args.fp8_lm_head)
        cluster = make_cluster(args.gpu, args.gpus, args.interconnect, args.gpus_per_node, args.network)
        profile = load_profile(args.profile) if args.profile else None
        workload = Workload(max_model_len=args.max_model_len, input_len=args.input_len,
                            output_len=args.output_len, max_num_seqs=args.max_num_seqs,
                            slo_tpot_ms=args.slo_tpot_ms, slo_ttft_ms=args.slo_ttft_ms,
                            kv_bytes=1 if args.kv_dtype == "fp8" else 2)
        plan = make_plan(model, cluster, workload, profile, allow_fp8=args.allow_fp8)
    except PlanError as exc:
        print(f"shardlm plan: error: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            plot_plan(plan, args.plot)
        except ImportError:
            print("shardlm plan: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"shardlm plan: error: cannot write {args.plot}: {exc}", file=sys.stderr)
            return 2
    if args.json:
        _print_out(json.dumps(plan_to_dict(plan), indent=2))
    else:
        _print_out(format_table(plan) + (f"\nplot written to {args.plot}" if args.plot else ""))
    return 0 if plan.recommended else 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: `python -m shardlm.planner.cli plan ...`."""
    parser = argparse.ArgumentParser(prog="shardlm")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
