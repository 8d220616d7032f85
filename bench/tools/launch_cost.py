# Host time of a kernel launch (issue 13 part 1: the k/v rows' public time carries host time).
#   python bench/tools/launch_cost.py            # CPU parts of the JIT's launch (no GPU needed)
#   python bench/tools/launch_cost.py --gpu      # + host us per search call and public ms, JIT vs fast launch
"""Where a JIT launch's host time goes (binder, cache key, the globals check), and what fp4cal.search.launch saves:
host microseconds per search_triton call (no host wait, the GPU queue kept short) and the public call's do_bench
median, JIT launch and fast launch interleaved, on the family rows' k/v inputs."""

import argparse
import os
import sys
import time
import timeit

import torch

sys.path.insert(0, "src")
sys.path.insert(0, "tests")
sys.path.insert(0, "bench")


def cpu_parts(n=3000):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from fp4cal.search import launch
    from fp4cal.search.sweep_rows import _sweep_rows_kernel as k

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(k.signature, k.params, backend)
    t = [torch.empty(1024, dtype=torch.float32) for _ in range(18)]
    w = torch.empty(1, 1024, 4096, dtype=torch.bfloat16)
    args = (w, *t[:12], *(x.view(torch.int32) for x in t[12:17]), 262144, 1024, 256, 256, 4194304, 4096, 1, 0,
            262144)
    opts = dict(HESSIAN=True, STATS=False, BR=32, FUSED=False, LOSSES=False, EXACT=True, REFILL=4, UNROLL=2,
                BOX_EVERY=4, num_warps=1, enable_fp_fusion=False, maxnreg=255, debug=False)
    _, spec, o = binder(*args, **opts)
    k.cache_key  # noqa: B018 (fills used_global_vals)
    key_cache = {}

    def globals_check():
        missing = object()
        for (name, _), (val, gd) in k.used_global_vals.items():
            if gd.get(name, missing) != val:
                raise RuntimeError(name)

    rows = {
        "JIT binder (native specialization)": lambda: binder(*args, **opts),
        "JIT cache key (its cache warm)": lambda: compute_cache_key(key_cache, spec, o),
        f"JIT globals check ({len(k.used_global_vals)} constexprs)": globals_check,
        "fast: arg_key + dict lookup": lambda: {}.get((0, launch.arg_key(args), tuple(opts.items()))),
    }
    print(f"sweep kernel, {len(args)} positional arguments, CPU parts of a launch (us):")
    for name, fn in rows.items():
        print(f"  {name:45s} {timeit.timeit(fn, number=n) / n * 1e6:7.2f}")


def gpu_parts(calls=300):
    import triton

    from bench_search import family_hessian, family_weight
    from fp4cal.search import kernels, launch, search_scales

    w, g = family_weight(1024, 4096)
    res = {}
    for fam in ("well", "rank1"):
        h = family_hessian(fam, 1024, 4096)
        for method, hh in (("mse", None), ("local_hessian", h)):
            for mode in (False, True, False, True):
                launch.ENABLED = mode
                for _ in range(3):
                    kernels.search_triton(w, method, g, hh, checked=False, sync=False)
                torch.cuda.synchronize()
                host = 0.0
                for i in range(calls):
                    t0 = time.perf_counter()
                    kernels.search_triton(w, method, g, hh, checked=False, sync=False)
                    host += time.perf_counter() - t0
                    if i % 8 == 7:
                        torch.cuda.synchronize()
                pub = triton.testing.do_bench(lambda hh=hh, method=method: search_scales(w, method, hh, g),
                                              warmup=10, rep=100, return_mode="median")
                key = (fam, method, "fast" if mode else "JIT")
                res.setdefault(key, []).append((host / calls * 1e6, pub))
    launch.ENABLED = True
    print("k/v 1024 x 4096: host us per search_triton call (launches, no wait) / public ms (do_bench median)")
    for (fam, method, mode), v in res.items():
        if fam == "well" or method == "local_hessian":
            print(f"  {fam:6s} {method:14s} {mode:5s} " + "  ".join(f"{a:7.1f} us / {b:.3f} ms" for a, b in v))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        cpu_parts()
    if args.gpu:
        gpu_parts()


if __name__ == "__main__":
    main()
