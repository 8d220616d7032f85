# Helper "search4" (2026-11-30): GPU time of each search kernel (prep, sweep, float64 pass) per Hessian family and
# shape, from the CUDA profiler, for search_triton with exact=True and exact=False (what a change costs where).
#   python bench/tools/kernel_times.py [--iters 20] [--src DIR --fp32-only]   (DIR: another commit's src/, extracted)
import argparse
import collections
import inspect
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

SRC = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else "src"
sys.path.insert(0, SRC)
sys.path.insert(0, "tests")
from fp4cal.search.kernels import search_triton  # noqa: E402

sys.path.insert(0, os.path.join("bench"))
from bench_search import family_hessian, family_weight  # noqa: E402

SHAPES = [("q/o", 4096, 4096), ("k/v", 1024, 4096)]


def kernel_us(fn, iters):
    """Mean GPU microseconds per call of each kernel fn launches (CUDA profiler)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = collections.defaultdict(float)
    for avg in prof.key_averages():
        for key in ("_prep_kernel", "_sweep_rows_kernel", "_rescore_kernel"):
            if key in avg.key:
                out[key] += avg.self_device_time_total / iters
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--src", default="src")
    ap.add_argument("--families", default="well,rank1,rank2", help="comma list of bench_search's Hessian families")
    ap.add_argument("--set", default="", help="comma list of NAME=INT: kernels.py settings to change (variants)")
    ap.add_argument("--shapes", default="q/o,k/v", help="comma list of " + ", ".join(n for n, _, _ in SHAPES))
    ap.add_argument("--exact-only", action="store_true", help="exact=True only")
    ap.add_argument("--fp32-only", action="store_true",
                    help="exact=False only (search2's exact=True inlines float64 in the walk: minutes to compile)")
    args = ap.parse_args()
    has_exact = "exact" in inspect.signature(search_triton).parameters
    for kv in filter(None, args.set.split(",")):
        name, val = kv.split("=")
        setattr(sys.modules[search_triton.__module__], name, int(val))
        print("set", name, "=", val)
    print("sources:", os.path.dirname(os.path.dirname(os.path.abspath(inspect.getfile(search_triton)))))
    print(f"{'shape':6s} {'hessian':8s} {'exact':5s} {'prep us':>8s} {'sweep us':>9s} {'f64 pass us':>11s}")
    for name, cout, cin in (s for s in SHAPES if s[0] in args.shapes.split(",")):
        w, g = family_weight(cout, cin)
        for fam in args.families.split(","):
            h = family_hessian(fam, cout, cin)
            modes = (False,) if args.fp32_only else (True,) if args.exact_only else (True, False)
            for exact in modes if has_exact else (None,):
                kw = {} if exact is None else {"exact": exact}
                t = kernel_us(lambda w=w, h=h, g=g, kw=kw: search_triton(w, "local_hessian", g, h, **kw), args.iters)
                print(f"{name:6s} {fam:8s} {exact!s:5s} {t['_prep_kernel']:8.1f} {t['_sweep_rows_kernel']:9.1f} "
                      f"{t['_rescore_kernel']:11.1f}", flush=True)


if __name__ == "__main__":
    main()
