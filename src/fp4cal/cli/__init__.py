"""Command-line front end. Each sub-command lives in its own module and is imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module that defines add_arguments(parser) and run(args) -> int
COMMANDS = {
    "demo": ("fp4cal.cli.demo", "max / MSE scale search on the bundled real model, per-layer error table"),
    "quantize": ("fp4cal.cli.quantize", "calibrate a model and (optionally) export an NVFP4 checkpoint"),
    "eval": ("fp4cal.cli.evaluate", "compare scale-search methods on held-out data and write a report"),
    "check": ("fp4cal.cli.check", "what vLLM / SGLang / TensorRT-LLM / transformers would reject in a checkpoint"),
}


def main(argv: list[str] | None = None) -> int:
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
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
