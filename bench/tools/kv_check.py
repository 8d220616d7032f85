# Helper "kvslow" (2026-11-30, issue 13): where the k/v shape's fp32-only local-Hessian call time goes, per Hessian.
# For each case: the public fp32-only call (do_bench median, as bench_search's family rows time it), the GPU work
# alone (CUDA graph of the launches, no host wait), the CUDA profiler's time of each kernel (prep, sweep) and the
# host's CPU time to issue one call. The cases separate the suspects of the k/v 'well' row (0.351 ms at search2,
# 0.545 / 0.608 ms since search3, while every other k/v family scales with the shape from q/o and gate/up):
#   kv/well       the bench's k/v 'well' Hessian (make_case(1024, 4096, seed=0))
#   kv/well-qoH   the same k/v weight with q/o's 'well' Hessian (make_case(4096, 4096, seed=0))
#   kv/deadblock  the k/v weight with the 'deadblock' Hessian (0.376 ms in the same run)
#   qo/well       q/o's weight and Hessian (1.25 ms)
# Each case is timed twice, the second pass in reverse order (an order or warm-up effect shows as a difference).
#   python bench/tools/kv_check.py [--src DIR]    (DIR: another commit's src/, e.g. search2's, extracted)
import argparse
import inspect
import os
import sys
import time

import torch
import triton

SRC = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else "src"
sys.path.insert(0, SRC)
sys.path.insert(0, "tests")
sys.path.insert(0, "bench")
sys.path.insert(0, os.path.join("bench", "tools"))
from kernel_times import kernel_us  # noqa: E402

from bench_search import family_weight, make_case  # noqa: E402
from fp4cal.search import kernels  # noqa: E402
from kernel_cases import make_ill_hessian  # noqa: E402


def host_ms(fn, n=50):
    """CPU time to issue one call without its host wait (sync=False), GPU drained between calls."""
    total = 0.0
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    torch.cuda.synchronize()
    return total * 1e3 / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="src")
    ap.parse_args()
    kw = {"exact": False} if "exact" in inspect.signature(kernels.search_triton).parameters else {}
    print("sources:", os.path.dirname(os.path.dirname(os.path.abspath(inspect.getfile(kernels.search_triton)))),
          "| device:", torch.cuda.get_device_name(), "| triton", triton.__version__)
    w_kv, g_kv = family_weight(1024, 4096)
    w_qo, g_qo = family_weight(4096, 4096)
    h_kv = make_case(1024, 4096, seed=0, dev="cuda")[1]
    h_qo = make_case(4096, 4096, seed=0, dev="cuda")[1]
    h_db = make_ill_hessian("deadblock", 4096, "cuda", seed=0)
    cases = {"kv/well": (w_kv, g_kv, h_kv), "kv/well-qoH": (w_kv, g_kv, h_qo), "kv/deadblock": (w_kv, g_kv, h_db),
             "qo/well": (w_qo, g_qo, h_qo)}
    for name, (w, g, h) in cases.items():  # compile and warm every variant first
        kernels.search_triton(w, "local_hessian", g, h, **kw)
        hd = h.double()
        lam = torch.linalg.eigvalsh((hd + hd.transpose(-1, -2)) / 2)  # no Triton compile (the factor kernel's)
        cond = float((lam[:, 0] / lam[:, -1].clamp_min(1e-300)).min())
        print(f"{name:13s} Hessian: max |H - H^T| {float((h - h.transpose(-1, -2)).abs().max()):.3g}, smallest "
              f"lambda_min / lambda_max of a block {cond:.3g}")
    torch.cuda.synchronize()
    print(f"{'case':13s} {'pass':4s} {'public ms':>9s} {'graph ms':>9s} {'prep us':>8s} {'sweep us':>9s} "
          f"{'host issue ms':>13s}")
    for p, order in enumerate((list(cases), list(reversed(cases)))):
        for name in order:
            w, g, h = cases[name]

            def call(w=w, g=g, h=h):
                return kernels.search_triton(w, "local_hessian", g, h, **kw)

            def nosync(w=w, g=g, h=h):
                return kernels.search_triton(w, "local_hessian", g, h, sync=False, **kw)

            pub = triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")
            graph = triton.testing.do_bench_cudagraph(nosync)
            k = kernel_us(call, 10)
            print(f"{name:13s} {p + 1:4d} {pub:9.3f} {graph:9.3f} {k['_prep_kernel']:8.1f} "
                  f"{k['_sweep_rows_kernel']:9.1f} {host_ms(nosync):13.3f}", flush=True)


if __name__ == "__main__":
    main()
