"""Command line: `shardlm generate | plan` (flag names follow vLLM's)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import asdict

from ..common.config import ConfigError, check_output_path
from ..engine.arg_utils import EngineArgs
from ..engine.executor import WorkerError
from ..engine.streaming import visible_end


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    group = EngineArgs.add_cli_args(p)
    group.add_argument("--parallel", choices=["auto"], default=None,
                       help="auto: let the planner choose --tensor-parallel-size for the visible GPUs")
    group.add_argument("--plan-profile", default=None,
                       help="with --parallel auto: a `shardlm probe` profile to plan with")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens this likely")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--sampling-seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate past EOS")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="shardlm", description="Split LLMs across GPUs and serve them.")
    parser.add_argument("--version", action="version", version=f"shardlm {__version__}")
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
    _show_defaults(parser)
    return parser


class _DefaultsFormatter(argparse.HelpFormatter):
    """--help says each option's default, unless its text already does or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's --help with the defaults."""
    parser.formatter_class = _DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


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


def _auto_tp(engine_args: EngineArgs, plan_profile: str | None) -> int:
    """--parallel auto: ask the planner, among the layouts the engine runs today (TP only)."""
    from ..common.model_source import resolve_model
    from ..engine.llm_engine import resolve_device, visible_gpus
    from ..planner.auto import recommend_for_engine

    if resolve_device(engine_args.device) == "cpu":
        print("shardlm: --parallel auto on CPU: tensor_parallel_size=1 (worker processes share the same cores, "
              "so splitting layers only adds communication)", file=sys.stderr)
        return 1
    config = resolve_model(engine_args.model).config
    rec = recommend_for_engine(config.to_dict(), visible_gpus(), None, None,
                               engine_args.max_model_len or config.max_position_embeddings, plan_profile,
                               supported=("tp",), model_name=engine_args.model)
    print(f"shardlm: --parallel auto: tensor_parallel_size={rec['tp']}. {rec['reason']}", file=sys.stderr)
    return rec["tp"]


def _engine_args(args: argparse.Namespace) -> EngineArgs:
    engine_args = EngineArgs.from_cli_args(args)
    if args.parallel == "auto":
        if args.tensor_parallel_size is not None:
            raise ValueError("--parallel auto chooses --tensor-parallel-size itself: give one or the other")
        engine_args.tensor_parallel_size = _auto_tp(engine_args, args.plan_profile)
    return engine_args


def run_generate(args: argparse.Namespace) -> int:
    from ..engine.sampling_params import SamplingParams
    from .llm import LLM

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)
    check_output_path("--save-expert-load", args.save_expert_load)
    llm = LLM(**asdict(_engine_args(args)))
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
    if args.command in ("generate", "bench", "probe"):  # the engine's start-up lines (all-reduce path, ranks' speed)
        engine_log = logging.getLogger("shardlm.engine")
        if not engine_log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            engine_log.addHandler(handler)
            engine_log.setLevel(logging.INFO)
            engine_log.propagate = False
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "bench" and args.bench_kind == "serve":
            from .bench_serve import run_serve_bench

            return run_serve_bench(args)
        if args.command == "bench":
            from .bench import run_bench

            return run_bench(args, _engine_args(args))
        if args.command == "serve":
            from ..server.main import run_serve

            args.model = args.model_tag or args.model
            return run_serve(args, _engine_args(args))
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
