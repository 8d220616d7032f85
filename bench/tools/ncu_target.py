# Twelfth session (2026-11-30): a target for Nsight Compute (`ncu`): `--calls` public local-Hessian search calls on
# one bench family and shape, nothing else on the GPU. Not run by CI.
#   ncu --clock-control none -k regex:_sweep_rows --launch-skip 1 --launch-count 1 --section ... \
#       python3 bench/tools/ncu_target.py --shape 1024x4096 --family collinear
"""Run search_scales(w, "local_hessian", h, g) `--calls` times on bench_search's family weight and Hessian (the
first call compiles; skip its launches in ncu)."""

import argparse
import sys

import torch

sys.path.insert(0, sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else "src")  # another checkout
sys.path.insert(0, "tests")
sys.path.insert(0, "bench")
from bench_search import family_hessian, family_weight  # noqa: E402
from fp4cal import search_scales  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1024x4096")
    ap.add_argument("--family", default="collinear")
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--src", default="src", help="the fp4cal sources to run (another commit's src/, extracted)")
    args = ap.parse_args()
    cout, cin = map(int, args.shape.split("x"))
    w, g = family_weight(cout, cin)
    h = family_hessian(args.family, cout, cin)
    for _ in range(args.calls):
        search_scales(w, "local_hessian", h, g)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
