# Eleventh session (2026-11-30): the GPU timeline of consecutive public search calls (issue 13 part 1: the k/v rows'
# public time exceeds the sum of their kernels by 40-85 us). Not run by CI.
#   python bench/tools/timeline.py [--families well,rank1] [--calls 30] [--shape 1024x4096]
"""Where a public search_scales call's GPU time goes between its kernels: the CUDA profiler's trace of `--calls`
back-to-back calls (queued as a benchmark queues them), then for two calls in the middle every GPU activity
(kernels, copies, fills) with its start relative to the call's first activity, its duration and the idle gap
before it; and per call, the period (first activity to the next call's first) against the sum of the durations."""

import argparse
import json
import os
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "src")
sys.path.insert(0, "tests")
sys.path.insert(0, "bench")
from bench_search import family_hessian, family_weight  # noqa: E402
from fp4cal import search_scales  # noqa: E402


def gpu_events(trace_path):
    with open(trace_path) as f:
        ev = json.load(f)["traceEvents"]
    keep = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(keep, key=lambda e: e["ts"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="well,rank1,collinear")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--shape", default="1024x4096")
    args = ap.parse_args()
    cout, cin = map(int, args.shape.split("x"))
    w, g = family_weight(cout, cin)
    for fam in args.families.split(","):
        h = family_hessian(fam, cout, cin)
        for _ in range(3):
            search_scales(w, "local_hessian", h, g)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                search_scales(w, "local_hessian", h, g)
            torch.cuda.synchronize()
        path = os.path.join(tempfile.mkdtemp(), "trace.json")
        prof.export_chrome_trace(path)
        ev = gpu_events(path)
        # a call starts at the flags' fill (the first activity of search_triton)
        starts = [i for i, e in enumerate(ev) if e["cat"] == "gpu_memset" or "fill" in e["name"].lower()]
        if len(starts) < 4:
            print(fam, "could not split the calls:", [e["name"][:40] for e in ev[:12]])
            continue
        periods, busy = [], []
        for a, b in zip(starts[1:-1], starts[2:], strict=True):
            periods.append(ev[b]["ts"] - ev[a]["ts"])
            busy.append(sum(e["dur"] for e in ev[a:b]))
        periods.sort()
        busy.sort()
        print(f"== {fam} {cout}x{cin}: period median {periods[len(periods) // 2]:.1f} us, busy median "
              f"{busy[len(busy) // 2]:.1f} us over {len(periods)} calls")
        mid = len(starts) // 2
        t0 = ev[starts[mid]]["ts"]
        prev_end = None
        for e in ev[starts[mid]:starts[mid + 2]]:
            gap = 0.0 if prev_end is None else e["ts"] - prev_end
            print(f"  +{e['ts'] - t0:8.1f} us  {e['dur']:7.1f} us  gap {gap:6.1f}  {e['cat']:10s} {e['name'][:60]}")
            prev_end = e["ts"] + e["dur"]


if __name__ == "__main__":
    main()
