"""The CLI's wall clock: seconds since the operating system started this process, and an opt-in trace.

A user waits from the moment they press enter, not from the moment fp4cal's code starts: the interpreter and the
imports (torch, Triton, transformers) come first. ``process_age()`` reads the process's start time from Linux's
/proc (10 ms resolution), so the summary's "startup" phase and its total are the wall clock the user saw up to
the summary. Elsewhere it falls back to the import of this module (the interpreter's start is then not counted).
A programmatic ``fp4cal.cli.main([...])`` call counts from its own start instead (``start_here``): the caller's
process may have lived for hours before it.

``FP4CAL_TRACE=1`` prints one stderr line per step ("[fp4cal trace]  12.345 s  <step>"), and one when the
process begins to exit, so a slow step or a slow exit can be found without a profiler.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path

_IMPORTED = time.perf_counter()


def _age_from_proc() -> float | None:
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime (fields after the name)
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


# perf_counter value at which the process started (proc start time once, then the monotonic clock)
_AGE0 = _age_from_proc()
_START = _IMPORTED - (_AGE0 if _AGE0 is not None else 0.0)


def process_age() -> float:
    """Seconds since the process started (Linux), or since this module was imported (elsewhere), or since the
    last start_here()."""
    return time.perf_counter() - _START


def start_here() -> None:
    """Count process_age() from now on (a command run from Python code rather than from a shell)."""
    global _START
    _START = time.perf_counter()


def tracing() -> bool:
    return os.environ.get("FP4CAL_TRACE", "") not in ("", "0")


def trace(step: str) -> None:
    """With FP4CAL_TRACE set: one stderr line with the process age and the step."""
    if tracing():
        print(f"[fp4cal trace] {process_age():8.3f} s  {step}", file=sys.stderr, flush=True)


if tracing():
    trace("clock imported")
    atexit.register(trace, "interpreter exit begins (atexit)")
