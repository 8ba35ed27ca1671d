"""Command line: `shardlm generate | plan` (flag names follow vLLM's)."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..common.config import ConfigError, check_output_path
from ..engine.executor import WorkerError
from ..engine.streaming import visible_end


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="built-in name (default smollm2-135m), HF checkpoint folder, "
                                                 ".gguf file, or random:<preset> (e.g. random:llama-3-8b)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None, help="GPUs / processes per layer split (default 1)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--pp-layer-split", default=None,
                   help="layers per stage, comma-separated (e.g. 10,14); default balances the weights")
    p.add_argument("--max-batches-in-flight", type=int, default=None,
                   help="pipeline micro-batches in flight at once (default: the pipeline size; 1 = no overlap)")
    p.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace of every rank's steps to this file")
    p.add_argument("--parallel", choices=["auto"], default=None,
                   help="auto: let the planner choose the layout for the visible GPUs")
    p.add_argument("--plan-profile", default=None, help="with --parallel auto: a `shardlm probe` profile to plan with")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences per step")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory to use")
    p.add_argument("--enforce-eager", action="store_true",
                   help="GPU: run decode steps eagerly instead of replaying CUDA graphs")
    p.add_argument("--max-seq-len-to-capture", type=int, default=8192,
                   help="GPU: decode steps with a longer context than this run eagerly (default 8192)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share KV blocks of identical prompt prefixes (default on)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE: whole experts on the TP ranks, tokens dispatched by all-to-all (default: experts split like the MLP)")
    p.add_argument("--expert-placement", choices=["round_robin", "balanced"], default="round_robin",
                   help="with --enable-expert-parallel: which rank holds which expert")
    p.add_argument("--expert-load", default=None,
                   help="with --expert-placement balanced: tokens per expert from --save-expert-load")
    p.add_argument("--num-redundant-experts", type=int, default=0,
                   help="with --expert-placement balanced: extra copies of the hottest experts")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate past EOS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardlm", description="Split LLMs across GPUs and serve them.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts (streams a single prompt)")
    gen.add_argument("prompts", nargs="+", help="prompt text")
    gen.add_argument("--no-chat-template", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--save-expert-load", default=None,
                     help="MoE: write tokens per expert per layer to this JSON file (input of --expert-load)")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    from ..planner.cli import add_plan_parser
    from ..server.main import add_serve_parser
    from .bench import add_bench_parser
    from .probe import add_probe_parser

    _add_engine_args(add_bench_parser(sub))
    add_plan_parser(sub)
    add_probe_parser(sub)
    _add_engine_args(add_serve_parser(sub))
    return parser


def _stream_one(llm, prompt, params) -> None:
    shown = 0
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        end = visible_end(text, shown, out.finished, params.stop)
        if end > shown:
            sys.stdout.write(text[shown:end])
            sys.stdout.flush()
            shown = end
    sys.stdout.write("\n")


def _auto_tp(args: argparse.Namespace) -> int:
    """--parallel auto: ask the planner, among the layouts the engine runs today (TP only)."""
    if args.tensor_parallel_size is not None:
        raise ValueError("--parallel auto chooses --tensor-parallel-size itself: give one or the other")
    from ..common.model_source import resolve_model
    from ..engine.llm_engine import LLMEngine, _visible_gpus
    from ..planner.auto import recommend_for_engine

    if LLMEngine._pick_device(args.device) == "cpu":
        print("shardlm: --parallel auto on CPU: tensor_parallel_size=1 (worker processes share the same cores, "
              "so splitting layers only adds communication)", file=sys.stderr)
        return 1
    config = resolve_model(args.model).config
    rec = recommend_for_engine(config.to_dict(), _visible_gpus(), None, None,
                               args.max_model_len or config.max_position_embeddings, args.plan_profile,
                               supported=("tp",), model_name=args.model)
    print(f"shardlm: --parallel auto: tensor_parallel_size={rec['tp']}. {rec['reason']}", file=sys.stderr)
    return rec["tp"]


def _engine_kwargs(args: argparse.Namespace) -> dict:
    tp = _auto_tp(args) if args.parallel == "auto" else (args.tensor_parallel_size or 1)
    split = None
    if args.pp_layer_split:
        try:
            split = [int(n) for n in args.pp_layer_split.split(",")]
        except ValueError:
            raise ValueError(f"--pp-layer-split must be comma-separated integers, got {args.pp_layer_split!r}") from None
    return dict(model=args.model, tensor_parallel_size=tp, pipeline_parallel_size=args.pipeline_parallel_size,
                pp_layer_split=split, max_batches_in_flight=args.max_batches_in_flight, trace=args.trace,
                dtype=args.dtype,
                device=args.device, seed=args.seed, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                max_seq_len_to_capture=args.max_seq_len_to_capture, enable_prefix_caching=args.enable_prefix_caching,
                enable_expert_parallel=args.enable_expert_parallel, expert_placement=args.expert_placement,
                expert_load=args.expert_load, num_redundant_experts=args.num_redundant_experts)


def run_generate(args: argparse.Namespace) -> int:
    from ..engine.sampling_params import SamplingParams
    from .llm import LLM

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)
    check_output_path("--save-expert-load", args.save_expert_load)
    llm = LLM(**_engine_kwargs(args))
    try:
        tok = llm.get_tokenizer()
        use_chat = not args.no_chat_template and getattr(getattr(tok, "tok", None), "chat_template", None)
        prompts = [{"prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": p}])} if use_chat else p
                   for p in args.prompts]
        if len(prompts) == 1:
            _stream_one(llm, prompts[0], params)
        else:
            for text, out in zip(args.prompts, llm.generate(prompts, params)):
                print(f"### {text}\n{out.outputs[0].text}\n")
        if args.save_expert_load:
            llm.save_expert_load(args.save_expert_load)
            stats = llm.expert_stats()
            print(f"shardlm: expert load written to {args.save_expert_load} (mean step imbalance over "
                  f"ranks {stats['mean_imbalance']:.2f})", file=sys.stderr)
    finally:
        llm.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "bench" and args.bench_kind == "serve":
            from .bench_serve import run_serve_bench

            return run_serve_bench(args)
        if args.command == "bench":
            from .bench import run_bench

            return run_bench(args, _engine_kwargs(args))
        if args.command == "serve":
            from ..server.main import run_serve

            args.model = args.model_tag or args.model
            return run_serve(args, _engine_kwargs(args))
        if args.command == "probe":
            from .probe import run_probe_cli

            return run_probe_cli(args)
        if args.command == "plan":
            from ..planner.cli import run_plan

            return run_plan(args)
    except KeyboardInterrupt:
        print("\nshardlm: interrupted; workers stopped", file=sys.stderr)
        return 130
    except (WorkerError, RuntimeError, OSError) as exc:
        print(f"shardlm: error: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError) as exc:
        print(f"shardlm: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
