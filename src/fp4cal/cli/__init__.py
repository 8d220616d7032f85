"""Command-line front end. Each sub-command lives in its own module and is imported only when used."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# sub-command -> module that defines add_arguments(parser) and run(args) -> int
COMMANDS = {
    "demo": ("fp4cal.cli.demo", "max / MSE scale search on the bundled real model, per-layer error table"),
    "quantize": ("fp4cal.cli.quantize", "calibrate a model and (optionally) export an NVFP4 checkpoint"),
    "eval": ("fp4cal.cli.evaluate", "compare scale-search methods on held-out data and write a report"),
    "check": ("fp4cal.cli.check", "what vLLM / SGLang / TensorRT-LLM / transformers would reject in a checkpoint"),
}


def main(argv: list[str] | None = None) -> int:
    from fp4cal.cli import clock

    command_line = argv is None
    if not command_line:  # called from Python: the wall clock of this command starts here, not at process start
        clock.start_here()
    parser = argparse.ArgumentParser(prog="fp4cal", description="NVFP4 quantization with accurate block scales")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:  # import only the module that runs
            importlib.import_module(module).add_arguments(p)
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    run = importlib.import_module(COMMANDS[args.command][0]).run
    profile = os.environ.get("FP4CAL_PROFILE")
    if profile:  # a cProfile of the command (main thread), for finding where a slow run's time went
        import cProfile

        prof = cProfile.Profile()
        try:
            code = int(prof.runcall(run, args) or 0)
        finally:
            prof.dump_stats(profile)
    else:
        code = int(run(args) or 0)
    if command_line:  # nothing is left to do but leave
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown, which takes a second or more once torch, Triton and
    transformers are loaded (and longer with a CUDA context and a model on the GPU): the command's files are
    written and renamed and its threads joined by now, so only the output streams and log handlers need
    flushing. atexit handlers do not run (clock's exit trace prints its line here instead)."""
    from fp4cal.cli import clock

    clock.trace("exit (skipping the interpreter's teardown)")
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
