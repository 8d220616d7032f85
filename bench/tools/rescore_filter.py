# Helper "rescore5" (2026-11-30): what the float64 pass's fp32 filter (rescore.py) keeps of mode 2, per Hessian
# family and shape, on the bench's weights: mode-2 blocks, window candidates and kept ones per block, and the warp
# steps of the fp32 walk and of the float64 loop (summed over steps; a step is BR = 32 blocks on a GPU), with the
# filter's soundness checked from the kernel's masks (kernel_cases.check_mode2_filter). Times: kernel_times.py.
#   python bench/tools/rescore_filter.py [--families rank1,rank2,well] [--shapes q/o,k/v,gate/up]
import argparse
import os
import sys

import torch

sys.path.insert(0, "src")
sys.path.insert(0, "tests")
sys.path.insert(0, "bench")
from bench_search import family_hessian, family_weight  # noqa: E402
from fp4cal.search.kernels import search_triton  # noqa: E402
from kernel_cases import check_mode2_filter  # noqa: E402

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (12288, 4096), "tiny": (32, 64)}  # tiny: CPU smoke run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="rank1,rank2,deadchan,well")
    ap.add_argument("--shapes", default="q/o,k/v,gate/up")
    ap.add_argument("--no-check", action="store_true", help="skip the soundness check (float64 losses of all windows)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{'shape':8s} {'hessian':9s} {'mode2 %':>8s} {'window/blk':>10s} {'kept/blk':>9s} {'f32 steps':>9s} "
          f"{'f64 steps':>9s} {'f64 steps before':>16s}")
    for name in args.shapes.split(","):
        cout, cin = SHAPES[name]
        w, g = family_weight(cout, cin, dev=dev)
        for fam in args.families.split(","):
            h = family_hessian(fam, cout, cin, dev)
            st = torch.zeros(8 + 5 * w.numel() // 16, dtype=torch.int32, device=dev)
            search_triton(w, "local_hessian", g, h, rescore_stats=st)
            c = st[:6].tolist()
            if not args.no_check:
                assert tuple(check_mode2_filter(w, g, h, st)) == tuple(c[:3])
            n = max(c[0], 1)
            print(f"{name:8s} {fam:9s} {100.0 * c[0] / (w.numel() / 16):8.2f} {c[1] / n:10.1f} {c[2] / n:9.1f} "
                  f"{c[4]:9d} {c[3]:9d} {c[4] - c[5]:16d}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
