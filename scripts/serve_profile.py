"""Where a serving process's Python time goes: `shardlm serve ...` under yappi (CPU clock, every thread).

    python3 scripts/serve_profile.py OUT.txt serve MODEL [serve flags]

Writes each thread's CPU seconds and the functions with the most own time to OUT.txt when the server
exits (SIGTERM). A measuring aid for issue 16 (is the server process CPU-bound?); yappi is not a
dependency of shardlm.
"""

import runpy
import sys

import yappi


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    yappi.set_clock_type("cpu")
    yappi.start()
    sys.argv = ["shardlm", *argv]
    try:
        runpy.run_module("shardlm.entrypoints.cli", run_name="__main__")
    except SystemExit:
        pass
    finally:
        yappi.stop()
        with open(out, "w") as f:
            threads = sorted(yappi.get_thread_stats(), key=lambda t: -t.ttot)
            f.write("thread CPU seconds:\n")
            for t in threads:
                f.write(f"  {t.name:<24} id={t.id:<4} {t.ttot:8.2f} s  ({t.sched_count} scheduled)\n")
            for t in threads[:3]:
                f.write(f"\n-- thread {t.name} (id {t.id}): most own time --\n")
                stats = yappi.get_func_stats(filter={"ctx_id": t.id})
                for s in sorted(stats, key=lambda s: -s.tsub)[:25]:
                    f.write(f"  {s.tsub:8.3f} own {s.ttot:8.3f} total {s.ncall:>9} calls  {s.full_name[-110:]}\n")


if __name__ == "__main__":
    main()
