# Eighth session (issue 13): the lane-refill sweep's launch settings, per Hessian family, on one GPU.
# For each variant (register cap, lanes idle before a refill, rows per lane) and family: the public call with and
# without the float64 pass (do_bench medians), candidates per block and what a warp of 32 blocks paid (stats); every
# variant's picks must equal the first variant's bit for bit (the search is exact: a difference is a bug).
#   python bench/tools/sweep_tune.py [--src DIR] [--shapes qo,kv,gu] [--families well,rank1,...] [--variants ...]
# DIR: another checkout's src/ (e.g. the previous sweep, extracted with git archive) timed the same way; its kernels
# know no refill, so it runs one variant ("base").
import argparse
import os
import sys

import torch
import triton

SRC = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else "src"
sys.path.insert(0, SRC)
sys.path.insert(0, "tests")
sys.path.insert(0, "bench")
from bench_search import family_hessian, family_weight  # noqa: E402
from fp4cal.search import kernels  # noqa: E402

SHAPES = {"qo": (4096, 4096), "kv": (1024, 4096), "gu": (12288, 4096), "dn": (4096, 12288)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="src")
    ap.add_argument("--shapes", default="qo,kv")
    ap.add_argument("--families", default="well,rank1,rank2,rank8,collinear")
    ap.add_argument("--variants", default="255/4/16/2/1,168/4/16/2/1,255/8/16/2/1,255/4/8/2/1",
                    help="comma list of maxnreg/refill/rows-per-lane/unroll/fill-waves (0/1) (the first: kernels.py's "
                         "defaults, the reference the others' picks are compared with); empty: the defaults as set")
    ap.add_argument("--tag", default="")
    ap.add_argument("--import-modelopt", action="store_true",
                    help="import ModelOpt's sweep module first (what bench_search's process has: its host cost)")
    args = ap.parse_args()
    if args.import_modelopt:
        from modelopt.torch.kernels.quantization.gemm import nvfp4_fp8_sweep  # noqa: F401
    refill = hasattr(kernels, "_REFILL_LANES")
    variants = args.variants.split(",") if refill and args.variants else ["base"]
    rows = []
    for sname in args.shapes.split(","):
        cout, cin = SHAPES[sname]
        w, g = family_weight(cout, cin)
        for fam in args.families.split(","):
            h = family_hessian(fam, cout, cin)
            first = None
            for var in variants:
                if var != "base" and var:
                    nreg, rl, rpl, unroll, waves = (int(x) for x in var.split("/"))
                    kernels._MAXNREG_HESSIAN, kernels._REFILL_LANES, kernels._ROWS_PER_LANE = nreg, rl, rpl
                    kernels._UNROLL, kernels._FILL_WAVES = unroll, bool(waves)
                picks = kernels.search_triton(w, "local_hessian", g, h)
                same = "-" if first is None else str(bool(torch.equal(picks, first)))
                first = picks if first is None else first
                t_ex = triton.testing.do_bench(
                    lambda w=w, g=g, h=h: kernels.search_triton(w, "local_hessian", g, h), rep=100)
                t_32 = triton.testing.do_bench(
                    lambda w=w, g=g, h=h: kernels.search_triton(w, "local_hessian", g, h, exact=False), rep=100)
                progs = kernels.sweep_programs(w) if refill else triton.cdiv(cout, 32) * (cin // 16)
                st = torch.zeros(progs, 4, dtype=torch.int32, device="cuda")
                kernels.search_triton(w, "local_hessian", g, h, stats=st)
                st = st.double()
                cand = float(st[:, 2].sum()) / (w.numel() / 16)
                warp = float((st[:, 0] * 32 / st[:, 1]).mean()) if refill else float((st[:, 0] + st[:, 1]).mean())
                row = (args.tag, sname, fam, var, t_ex, t_32, cand, warp, same)
                rows.append(row)
                print("TUNE", fmt(row), flush=True)
    print("\nSUMMARY tag shape family variant exact_ms fp32_ms cand warp same")
    for r in rows:
        print("SUMMARY", fmt(r))


def fmt(r):
    tag, sname, fam, var, t_ex, t_32, cand, warp, same = r
    return f"{tag:6s} {sname:3s} {fam:9s} {var:12s} {t_ex:7.3f} {t_32:7.3f} {cand:5.1f} {warp:5.1f} {same}"


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    main()
