# Where the host's time goes in one search call (issue 13 part 1: the k/v rows' public time carries host time the GPU
# waits for): cProfile of back-to-back search_triton launches (no host wait), the top entries by own and by
# cumulative time, and the CPU microseconds per call of each phase.
#   python bench/tools/host_profile.py [--calls 300] [--method local_hessian] [--shape 1024x4096]
import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, "src")
sys.path.insert(0, "tests")
sys.path.insert(0, os.path.join("bench"))
from bench_search import family_hessian, family_weight  # noqa: E402
from fp4cal.search import kernels  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--method", default="local_hessian")
    ap.add_argument("--shape", default="1024x4096")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    cout, cin = (int(x) for x in args.shape.split("x"))
    w, g = family_weight(cout, cin)
    h = family_hessian("well", cout, cin) if args.method == "local_hessian" else None

    def call():
        kernels.search_triton(w, args.method, g, h, checked=False, sync=False)

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.calls):
        call()
        if i % 10 == 9:
            torch.cuda.synchronize()  # keep the launch queue short (a full queue blocks the host)
    torch.cuda.synchronize()
    print(f"{args.shape} {args.method}: {1e6 * (time.perf_counter() - t0) / args.calls:.1f} us per call, "
          f"host and GPU, 10 calls between host waits")
    prof = cProfile.Profile()
    prof.enable()
    for i in range(args.calls):
        call()
        if i % 10 == 9:
            torch.cuda.synchronize()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof)
    st.sort_stats("tottime").print_stats(args.top)
    st.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
