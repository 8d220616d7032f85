# Helper "rescore5" (2026-11-30): what the float64 pass's fp32 filter (rescore.py) keeps of mode 2, per Hessian
# family and shape, on the bench's weights: mode-2 blocks, window candidates and kept ones per block, with the
# filter's soundness checked from the kernel's masks (kernel_cases.check_mode2_filter). Times: kernel_times.py.
# Helper "rescore6", ninth session: mode 2 takes a warp, a group of 8 lanes or a lane per block, by the count of
# mode-2 blocks (rescore.py); the steps per block of the layout the kernel chose (fp32 and float64, its counters,
# checked against kernel_cases.mode2_steps) and the longest program's chain, beside what a lane per block would pay,
# modelled from the same records: batches of 32 blocks in index order, each batch (longest window + 1) fp32 steps
# and (largest kept count) float64 steps, all in one lane's chain.
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
from kernel_cases import check_mode2_filter, mode2_steps  # noqa: E402

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (12288, 4096), "tiny": (32, 64)}  # tiny: CPU smoke run


def lane_layout_steps(stats: torch.Tensor, lanes: int = 32) -> tuple[int, int, int]:
    """One block per lane (the layout before rescore6), modelled on stats' records: (batches, fp32 steps, float64
    steps), summed over batches of `lanes` recorded blocks in index order."""
    recs = stats[8:].view(-1, 5).cpu().long()
    recs = recs[(recs[:, 1:] != 0).any(1)]
    win = ((recs[:, 0] >> 8) & 255) - (recs[:, 0] & 255) + 1
    kept = ((recs[:, 1:, None] >> torch.arange(32)) & 1).sum((1, 2))
    n32 = n64 = 0
    for b in range(0, recs.shape[0], lanes):
        n32 += int(win[b : b + lanes].max()) + 1
        n64 += int(kept[b : b + lanes].max())
    return (recs.shape[0] + lanes - 1) // lanes, n32, n64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="rank1,rank2,deadchan,well")
    ap.add_argument("--shapes", default="q/o,k/v,gate/up")
    ap.add_argument("--no-check", action="store_true", help="skip the soundness check (float64 losses of all windows)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{'shape':8s} {'hessian':9s} {'mode2':>6s} {'%':>5s} {'win/blk':>7s} {'kept/blk':>8s} {'f32/blk':>7s} "
          f"{'f64/blk':>7s} {'chain':>6s} | lane layout: {'batches':>7s} {'f32/batch':>9s} {'f64/batch':>9s}")
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
            assert mode2_steps(st) == (c[4], c[3])
            nb_, o32, o64 = lane_layout_steps(st)
            n, m = max(c[0], 1), max(nb_, 1)
            print(f"{name:8s} {fam:9s} {c[0]:6d} {100.0 * c[0] / (w.numel() / 16):5.2f} {c[1] / n:7.1f} "
                  f"{c[2] / n:8.1f} {c[4] / n:7.2f} {c[3] / n:7.2f} {c[5]:6d} | {'':13s}{nb_:7d} {o32 / m:9.1f} "
                  f"{o64 / m:9.1f}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
