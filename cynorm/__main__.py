"""`python -m cynorm`: the self-check (cynorm._selfcheck); `python -m cynorm bench`: the
benchmark (cynorm.bench)."""
import argparse
import sys


def main(argv=None):
    from cynorm.bench import cli as bench_cli

    parser = argparse.ArgumentParser(
        prog="python -m cynorm",
        description="Without a command: a quick self-check of every op against a NumPy "
                    "reference (exit code 1 on failure).")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("check", help="the self-check (the default)")
    bench_parser = bench_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_cli.run(args, bench_parser)
    from cynorm._selfcheck import run_self_check
    return run_self_check()


if __name__ == "__main__":
    sys.exit(main())
