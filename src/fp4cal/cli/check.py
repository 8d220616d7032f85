"""fp4cal check: what each serving engine's loader will refuse, or load wrongly, in an NVFP4 checkpoint.

    fp4cal check CKPT_DIR [--engine vllm|sglang|tensorrt-llm|transformers] [--quiet]

Reads a compressed-tensors or Model Optimizer NVFP4 checkpoint (fp4cal's or anyone's), prints one line per
violation (severity, engines, tensor, what is wrong) and a verdict per engine. Exit status: 0 when no error
applies to the engines asked about, 1 when one does, 2 when the directory cannot be read.
"""

from __future__ import annotations

import argparse

from fp4cal.cli.common import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fp4cal.export.check import ENGINES

    p.add_argument("checkpoint", help="checkpoint directory (config.json, *.safetensors)")
    p.add_argument("--engine", action="append", choices=ENGINES, default=None,
                   help="check for this engine only (repeatable; default: all)")
    p.add_argument("--quiet", action="store_true", help="print only the verdict lines")


def run(args: argparse.Namespace) -> int:
    from fp4cal.export.check import ENGINES, check_checkpoint, format_findings, is_fatal
    from fp4cal.export.io import CheckpointError

    engines = tuple(dict.fromkeys(args.engine)) if args.engine else ENGINES
    try:
        findings = check_checkpoint(args.checkpoint, engines)
    except (FileNotFoundError, CheckpointError) as e:
        return fail("check", str(e))
    report = format_findings(findings, args.checkpoint, engines)
    if args.quiet:
        report = "\n".join(report.splitlines()[-len(engines):])
    print(report)
    return 1 if is_fatal(findings) else 0
