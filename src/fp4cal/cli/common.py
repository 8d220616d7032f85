"""What the sub-commands share: device parsing, argument checks and output-path checks, each failing with a
one-line message (``CliError``) that the command prints as ``fp4cal <command>: error: <message>``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path


class CliError(ValueError):
    """A problem with the command line the user can fix; printed on one line, exit status 2."""


def fail(command: str, msg: str, code: int = 2) -> int:
    """Print ``fp4cal <command>: error: <msg>`` on stderr and return ``code`` (the exit status)."""
    print(f"fp4cal {command}: error: {msg}", file=sys.stderr)
    return code


def parse_device(name: str, flag: str = "--device"):
    """A torch.device from 'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:N', 'mps', ...

    Raises CliError for a name torch does not know, an accelerator that is not available, a CUDA index past the
    visible GPUs, or 'meta' (a meta device holds no weights to calibrate)."""
    import torch

    if not isinstance(name, str) or not name.strip():
        raise CliError(f"{flag} must be a device name such as auto, cpu, cuda or cuda:1, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(f"{flag} {name!r} is not a torch device ({first}); expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "meta":
        raise CliError(f"{flag} meta holds no data; expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"{flag} {name} was asked for but CUDA is not available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise CliError(f"{flag} {name} was asked for but the {dev.type} backend is not available")
    return dev


def check_min(args: argparse.Namespace, names: Iterable[str], minimum: int = 1) -> None:
    """Each ``args.<name>`` that is not None must be >= minimum (CliError naming the option)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise CliError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def check_output_dir(path: str, flag: str = "--out", overwrite: bool | None = None) -> Path:
    """Check a checkpoint output directory before any work (fp4cal.export.io.check_out_dir's rule: no unsafe
    path, a non-empty directory only with overwrite and only when it is an NVFP4 checkpoint), and that it can
    be created. ``overwrite`` None: the command has no --overwrite option. Returns the resolved path; CliError
    with a one-line message otherwise."""
    from fp4cal.export.io import UnsafeOutputError, check_out_dir

    try:
        out = check_out_dir(path, bool(overwrite), what=flag)
    except FileExistsError as e:
        if "not a directory" in str(e):
            raise CliError(str(e)) from None
        hint = ("pass --overwrite to replace it if it is an NVFP4 checkpoint" if overwrite is not None
                else "choose a new or empty directory")
        raise CliError(f"{flag} {path!r} exists and is not empty; {hint}") from None
    except (UnsafeOutputError, TypeError) as e:
        raise CliError(str(e).replace("overwrite=True", "--overwrite")) from None
    _check_creatable(out, flag, path)
    return out


def _check_creatable(out: Path, flag: str, raw: str) -> None:
    """The nearest existing ancestor of ``out`` must be a writable directory."""
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"{flag} {raw!r}: {parent} is a file, so the directory cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {raw!r}: no permission to write in {parent}")


REPORT_FILES = ("report.md", "report.json", "layers.png")


def is_fp4cal_report(directory: Path) -> bool:
    """Whether ``directory/report.json`` is one fp4cal eval wrote (its keys), so its report may be replaced."""
    import json

    try:
        data = json.loads((directory / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"model", "methods", "summary", "metric"} <= set(data)


def check_report_dir(path: str, flag: str = "--out", overwrite: bool = False) -> Path:
    """Check eval's report directory before any work: no unsafe path (the export rule); an existing
    report.md / report.json / layers.png is replaced only with ``overwrite`` and only when report.json is an
    fp4cal report (other files in the directory are never touched). Returns the resolved path."""
    from fp4cal.export.io import UnsafeOutputError, check_output_path

    try:
        out = check_output_path(path, flag)
    except (UnsafeOutputError, TypeError) as e:
        raise CliError(str(e)) from None
    if out.exists() and not out.is_dir():
        raise CliError(f"{flag} {path!r} exists and is not a directory")
    present = [n for n in REPORT_FILES if (out / n).exists()]
    if present:
        if not overwrite:
            raise CliError(f"{flag} {path!r} already holds {', '.join(present)}; pass --overwrite to replace an "
                           "earlier fp4cal report, or choose another directory")
        if not is_fp4cal_report(out):
            raise CliError(f"{flag} {path!r} holds {', '.join(present)} but its report.json is not an fp4cal "
                           "report; --overwrite only replaces fp4cal reports: choose another directory")
    _check_creatable(out, flag, path)
    return out
