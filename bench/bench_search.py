"""Scale-search speed and parity on Qwen3-8B linear shapes and a 128-expert MoE stack (run on a CUDA GPU).

For each shape and objective: reference time (one run), fp4cal public-call time (median of do_bench, host-side
preparation included, as the ModelOpt anchor is timed), ModelOpt 0.47 kernel time when importable, the ratios,
weights per second, the counted floor, and parity counts (fp4cal vs reference; fp4cal vs ModelOpt).

    python bench/bench_search.py [--json OUT.json] [--variants] [--no-reference] [--no-families]
    python bench/bench_search.py --families-only --no-reference --moe-experts 32   # the issue-13 rows, ~2 min
    TRITON_INTERPRET=1 python bench/bench_search.py --smoke                        # CPU check of the family code

Ill-conditioned Hessian families (issue 13.1/13.2), rows of their own beside ModelOpt on the same input: rank-1,
rank-2 and rank-8 blocks, dead channels, near-collinear channel pairs, dead blocks, and the well-conditioned
Hessian of the same shape ("well") for the within-1.5x goal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from fp4cal import search_scales  # noqa: E402
from fp4cal.search import kernels  # noqa: E402
from fp4cal.search.parity import compare_picks  # noqa: E402
from fp4cal.search.reference import search_reference  # noqa: E402
from kernel_cases import ILL_CONDITIONED, make_ill_hessian  # noqa: E402

SHAPES = [("q_proj/o_proj", 4096, 4096, 2), ("k_proj/v_proj", 1024, 4096, 2), ("gate/up_proj", 12288, 4096, 2),
          ("down_proj", 4096, 12288, 1)]
LAYERS = 36
N_CAND = 126
# Counted per weight x candidate (see BENCHMARKS.md): rounding + error + loss, FP32-pipe instructions.
# Row kernel, mse: 12 rounding + 1 error + 1 loss.
OPS_MSE = 14
# Row kernel: 12 rounding + 1 error + 136 / 16 = 8.5 FMAs of the triangular product + 1 loss.
OPS_HESS = 22.5


def make_case(cout, cin, tokens=4096, seed=0, dev="cuda"):
    """The anchor's set-up: bf16 N(0, 0.02^2) weights with 0.1 % outliers x8; Hessians from log-normal channels."""
    torch.manual_seed(seed)
    w = torch.randn(cout, cin, device=dev) * 0.02
    w[torch.rand_like(w) < 1e-3] *= 8
    w = w.to(torch.bfloat16)
    chan = torch.exp(torch.randn(cin, device=dev))
    x = torch.randn(tokens, cin, device=dev) * chan
    xb = x.T.reshape(cin // 16, 16, tokens)
    return w, (xb @ xb.transpose(-1, -2)) / tokens


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_rounds(fns, rounds=5, rep=40):
    """Median over rounds of each variant's do_bench median, the variants interleaved round by round: on the
    lent H100s one variant's time moves by up to 1.5x over a run (clocks), so variants timed one after the
    other are not comparable."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def dump_ir(out_dir):
    """ttgir, ptx and register/spill counts of every compiled search kernel (for reading the layouts)."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    for fn in (kernels._sweep_rows_kernel,):  # re-exported by kernels
        for dev_cache in getattr(fn, "device_caches", {}).values():
            for i, k in enumerate(dev_cache[0].values()):
                k._init_handles()
                print(f"{fn.__name__}[{i}]: regs {k.n_regs} spills {k.n_spills} warps {k.metadata.num_warps} "
                      f"shared {k.metadata.shared}")
                for ext in ("ttgir", "ptx"):
                    with open(f"{out_dir}/{fn.__name__}_{i}.{ext}", "w") as f:
                        f.write(k.asm[ext])


def load_modelopt():
    try:
        from modelopt.torch.kernels.quantization.gemm import nvfp4_fp8_sweep as mo

        return mo
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", reported below
        print(f"ModelOpt not importable ({type(exc).__name__}: {exc}); anchor columns left empty")
        return None


def lane_rate():
    p = torch.cuda.get_device_properties(0)
    clock_hz = 1.98e9 if "H100" in p.name or "H200" in p.name else 1.5e9
    return p.multi_processor_count * 128 * clock_hz  # fp32 lanes x clock


def run_shape(name, cout, cin, mo, do_ref, rows):
    w, h = make_case(cout, cin)
    g = w.float().abs().amax()
    res = {"shape": name, "cout": cout, "cin": cin}
    for method in ("mse", "local_hessian"):
        hh = h if method == "local_hessian" else None
        ours = search_scales(w, method, hh, g)
        fns = {"fp4cal_ms": lambda: search_scales(w, method, hh, g)}  # noqa: B023
        r = {}
        if do_ref:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ref = search_reference(w, method, g, hh)
            torch.cuda.synchronize()
            r["ref_ms"] = (time.perf_counter() - t0) * 1e3
            rep = compare_picks(w, g, ours, ref, hh)
            r["parity_ref"] = f"{rep.bad} bad / {rep.ties} ties / {rep.blocks}"
            r["parity_bad"] = rep.bad
        if mo is not None:
            xb = w.reshape(-1, 16)
            if method == "mse":
                fn = lambda xb=xb: mo.nvfp4_fp8_scale_sweep(xb, g, block_size=16)  # noqa: E731
            else:
                fn = lambda xb=xb: mo.nvfp4_fp8_scale_sweep_hessian(xb, g, h, block_size=16)  # noqa: E731
            theirs = fn().float().reshape(cout, cin // 16)
            fns["modelopt_ms"] = fn
            rep = compare_picks(w, g, ours, theirs, hh)
            r["parity_modelopt"] = f"{rep.differing} differ ({rep.ties} ties)"
        r.update(bench_rounds(fns, rounds=3, rep=100))  # fp4cal and ModelOpt interleaved
        t_ours = r["fp4cal_ms"]
        ops = OPS_MSE if method == "mse" else OPS_HESS
        r["floor_ms"] = cout * cin * N_CAND * ops / lane_rate() * 1e3
        r["gw_per_s"] = cout * cin / t_ours / 1e6
        res[method] = r
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    kernels.hessian_factor(h)
    torch.cuda.synchronize()
    res["factor_ms"] = (time.perf_counter() - t0) * 1e3
    rows.append(res)
    return w, h, g


def run_variants(w, h, g):
    """Host-side phases and window statistics on one shape (what the tuning is based on)."""
    out = []
    for method in ("mse", "local_hessian"):
        st = torch.zeros(kernels.sweep_programs(w), 4, dtype=torch.int32, device=w.device)
        kernels.search_triton(w, method, g, h if method != "mse" else None, stats=st)
        st = st.double()
        print(f"window stats {method}: walk steps per 32 blocks {(st[:, 0] * 32 / st[:, 1]).mean():.1f}, "
              f"per-block candidates {st[:, 2].sum() / (w.numel() / 16):.1f} of 126")
    from fp4cal.validation import check_hessian, check_weight

    out.append(("phase: check_weight", 0, 0, bench(lambda: check_weight(w, "w", allow_stack=True))))
    out.append(("phase: check_hessian", 0, 0, bench(lambda: check_hessian(h, w))))
    out.append(("phase: hessian_factor", 0, 0, bench(lambda: kernels.hessian_factor(h))))
    return out


def host_overhead(name, cout, cin):
    """Where a small call's time goes: the public call (do_bench), the GPU work alone (a CUDA graph of the
    launches, no host sync), and the host's CPU time per phase of one call (mean of 100 calls; validation,
    issuing the launches, waiting for the GPU at the one synchronisation)."""
    from triton.testing import do_bench_cudagraph

    from fp4cal.validation import check_global_amax, check_hessian, check_weight

    w, h = make_case(cout, cin)
    g = w.float().abs().amax()
    out = []
    for method in ("mse", "local_hessian"):
        hh = h if method == "local_hessian" else None
        row = {"public": bench(lambda: search_scales(w, method, hh, g))}  # noqa: B023
        row["GPU only (graph)"] = do_bench_cudagraph(
            lambda: kernels.search_triton(w, method, g, hh, sync=False))  # noqa: B023
        phases = {"cpu validate": 0.0, "cpu launches": 0.0, "wait for GPU": 0.0}
        n = 100
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            check_weight(w, "w", allow_stack=True, values=False)
            g2 = check_global_amax(g, w, values=False)
            if hh is not None:
                check_hessian(hh, w, values=False)
            t1 = time.perf_counter()
            kernels.search_triton(w, method, g2, hh, checked=False, sync=False)
            t2 = time.perf_counter()
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            phases["cpu validate"] += (t1 - t0) * 1e3 / n
            phases["cpu launches"] += (t2 - t1) * 1e3 / n
            phases["wait for GPU"] += (t3 - t2) * 1e3 / n
        row.update(phases)
        if hh is None:  # one launch (the sweep checks values and computes its scales) vs two, interleaved
            def call(fused):
                return lambda: kernels.search_triton(w, "mse", g, None, checked=False, fused=fused)

            row.update(bench_rounds({"one launch": call(True), "two launches": call(False)}, rounds=3))
        if hh is not None:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                kernels.prepare_factor(h)
            row["cpu per factor launch"] = (time.perf_counter() - t0) * 1e3 / n
            torch.cuda.synchronize()
        out.append((f"{name} {method}", row))
    return out


def run_moe(mo, rows):
    n_e, cout, cin = 128, 1536, 2048  # Qwen3-30B-A3B experts' gate_up_proj
    torch.manual_seed(1)
    w = (torch.randn(n_e, cout, cin, device="cuda") * 0.02).to(torch.bfloat16)
    g = w.float().abs().amax(dim=(1, 2))
    chan = torch.exp(torch.randn(n_e, 1, cin, device="cuda"))
    x = torch.randn(n_e, 512, cin, device="cuda") * chan
    xb = x.transpose(1, 2).reshape(n_e, cin // 16, 16, 512)
    h = xb @ xb.transpose(-1, -2) / 512
    res = {"shape": f"MoE {n_e}x{cout}x{cin}", "cout": cout, "cin": cin, "experts": n_e}
    for method in ("mse", "local_hessian"):
        hh = h if method == "local_hessian" else None
        ours = search_scales(w, method, hh, g)
        r = {"fp4cal_ms": bench(lambda: search_scales(w, method, hh, g))}  # noqa: B023
        bad = ties = 0
        for e in (0, n_e - 1):
            ref = search_reference(w[e], method, g[e], None if hh is None else hh[e])
            rep = compare_picks(w[e], g[e], ours[e], ref, None if hh is None else hh[e])
            bad, ties = bad + rep.bad, ties + rep.ties
        r["parity_ref"] = f"{bad} bad / {ties} ties (2 experts)"
        r["parity_bad"] = bad
        if mo is not None:
            def loop(method=method):
                for e in range(n_e):
                    xe = w[e].reshape(-1, 16)
                    if method == "mse":
                        mo.nvfp4_fp8_scale_sweep(xe, g[e], block_size=16)
                    else:
                        mo.nvfp4_fp8_scale_sweep_hessian(xe, g[e], h[e], block_size=16)
            r["modelopt_ms"] = bench(loop)
        r["gw_per_s"] = w.numel() / r["fp4cal_ms"] / 1e6
        r["floor_ms"] = w.numel() * N_CAND * (OPS_MSE if method == "mse" else OPS_HESS) / lane_rate() * 1e3
        res[method] = r
    rows.append(res)


def family_weight(cout, cin, n_e=1, dev="cuda"):
    """The family rows' weight: bf16 N(0, 0.02^2), 0.1 % outliers x8, seed 3, [cout, cin] (n_e == 1) or [n_e, cout,
    cin], and its global amax (per expert). The bench tools time the same inputs."""
    torch.manual_seed(3)
    w = torch.randn(n_e, cout, cin, device=dev) * 0.02
    w[torch.rand_like(w) < 1e-3] *= 8
    w = w.to(torch.bfloat16)
    if n_e == 1:
        w = w[0]
    return w, w.float().abs().amax(dim=(-2, -1))


def family_hessian(fam, cout, cin, dev="cuda", seed=0):
    """The family rows' Hessian blocks [cin/16, 16, 16]: 'well' is make_case's, any other family
    kernel_cases.make_ill_hessian's."""
    return make_case(cout, cin, seed=seed, dev=dev)[1] if fam == "well" else make_ill_hessian(fam, cin, dev, seed=seed)


def run_families(mo, do_ref, moe_experts=128, shapes=None, dev="cuda", families=None):
    """Local-Hessian time of fp4cal and ModelOpt on the same weights with each Hessian family, per Qwen3-8B shape
    and an expert stack (moe_experts x 1536 x 2048, 0: none); also fp4cal without its float64 pass (exact=False:
    the pass's cost), the sweep's window statistics (candidates tried per block, warp steps per program: what
    the GPU pays, the slowest block of each 32) and the blocks recorded for the float64 pass (mode 1: a pair,
    mode 2: all candidates); parity with the float64 reference (2-D shapes). dev="cpu": the interpreter, small
    shapes (a smoke run of this code path, times meaningless)."""
    out = []
    cases = [(name, cout, cin, 1) for name, cout, cin, _ in (shapes or SHAPES)]
    moe_cout, moe_cin = (1536, 2048) if dev == "cuda" else (16, 32)
    if moe_experts:
        cases.append((f"MoE {moe_experts}x{moe_cout}x{moe_cin}", moe_cout, moe_cin, moe_experts))
    for name, cout, cin, n_e in cases:
        w, g = family_weight(cout, cin, n_e, dev)
        for fam in families or ["well"] + ILL_CONDITIONED:
            hs = [family_hessian(fam, cout, cin, dev, seed=e) for e in range(min(n_e, 4))]
            h = hs[0] if n_e == 1 else torch.stack([hs[e % len(hs)] for e in range(n_e)])
            row = {"shape": name, "family": fam}
            ours = search_scales(w, "local_hessian", h, g)
            fns = {"fp4cal_ms": lambda w=w, h=h, g=g: search_scales(w, "local_hessian", h, g)}
            if n_e == 1:
                fns["fp32only_ms"] = lambda w=w, h=h, g=g: kernels.search_triton(w, "local_hessian", g, h, exact=False)
            if mo is not None:
                if n_e == 1:
                    xb = w.reshape(-1, 16)
                    fns["modelopt_ms"] = lambda xb=xb, h=h, g=g: mo.nvfp4_fp8_scale_sweep_hessian(xb, g, h,
                                                                                                  block_size=16)
                else:
                    def loop(w=w, h=h, g=g, n_e=n_e):
                        for e in range(n_e):
                            mo.nvfp4_fp8_scale_sweep_hessian(w[e].reshape(-1, 16), g[e], h[e], block_size=16)
                    fns["modelopt_ms"] = loop
            row.update(bench_rounds(fns, rounds=2, rep=40) if dev == "cuda" else time_once(fns))
            st = torch.zeros(kernels.sweep_programs(w), 4, dtype=torch.int32, device=dev)
            kernels.search_triton(w, "local_hessian", g, h, stats=st)
            st = st.double()
            n_blocks = w.numel() / 16
            row["cand_per_block"] = float(st[:, 2].sum()) / n_blocks
            row["warp_steps"] = float((st[:, 0] * 32 / st[:, 1]).mean())  # what 32 blocks paid, in candidates
            rec = st[:, 3].long()
            row["f64_pair_pct"] = 100.0 * float((rec & 0xFFFF).sum()) / n_blocks
            row["f64_full_pct"] = 100.0 * float((rec >> 16).sum()) / n_blocks
            if do_ref and n_e == 1:
                rep = compare_picks(w, g, ours, search_reference(w, "local_hessian", g, h), h)
                row["parity_ref"] = f"{rep.bad} bad / {rep.ties} ties / {rep.blocks}"
                row["parity_bad"] = rep.bad
            out.append(row)
            mo_ms = row.get("modelopt_ms")
            print(f"family {name:20s} {fam:10s} fp4cal {row['fp4cal_ms']:8.3f} ms  ModelOpt {fmt(mo_ms, '8.3f')} ms"
                  f"  MO/ours {fmt(mo_ms / row['fp4cal_ms'] if mo_ms else None, '6.2f')}  cand/block "
                  f"{row['cand_per_block']:5.1f}  warp steps {row['warp_steps']:5.1f}  float64 pass "
                  f"{row['f64_pair_pct']:.2f}% + {row['f64_full_pct']:.2f}%  parity {row.get('parity_ref', '-')}",
                  flush=True)
    return out


def time_once(fns):
    """One timed call per function (the interpreter's smoke run: no CUDA events)."""
    out = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        out[k] = (time.perf_counter() - t0) * 1e3
    return out


def print_families(families):
    """The family table: fp4cal (default call), without the float64 pass, ModelOpt, the ratios, per-family time over
    the well-conditioned row's, candidates per block, warp steps, blocks sent to the float64 pass, parity."""
    print(f"\n{'shape':20s} {'hessian':10s} {'fp4cal ms':>9s} {'fp32 only':>9s} {'ModelOpt':>9s} {'MO/ours':>7s} "
          f"{'/well':>6s} {'cand':>5s} {'warp':>5s} {'f64 %':>11s}  parity(ref)")
    well = {r["shape"]: r["fp4cal_ms"] for r in families if r["family"] == "well"}
    for r in families:
        mo_ms = r.get("modelopt_ms")
        print(f"{r['shape']:20s} {r['family']:10s} {r['fp4cal_ms']:9.3f} {fmt(r.get('fp32only_ms'), '9.3f'):>9s} "
              f"{fmt(mo_ms, '9.3f'):>9s} {fmt(mo_ms / r['fp4cal_ms'] if mo_ms else None, '7.2f'):>7s} "
              f"{r['fp4cal_ms'] / well[r['shape']]:6.2f} {r['cand_per_block']:5.1f} {r['warp_steps']:5.1f} "
              f"{r['f64_pair_pct']:5.2f}+{r['f64_full_pct']:4.2f}  {r.get('parity_ref', '-')}")


def print_overhead(rows):
    """host_overhead's rows, one line each."""
    for label, row in rows:
        print(f"host overhead {label}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row.items()))


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else str(v if v is not None else "-")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-families", action="store_true", help="skip the ill-conditioned Hessian rows")
    ap.add_argument("--families-only", action="store_true", help="only the Hessian-family rows")
    ap.add_argument("--moe-experts", type=int, default=128,
                    help="experts in the family rows' expert stack (0: no stack rows; fewer for a quicker run)")
    ap.add_argument("--families", help="comma list of the family rows' Hessians (default: well and every "
                    "ill-conditioned family)")
    ap.add_argument("--host", action="store_true",
                    help="only the host-overhead rows (public call vs GPU work alone vs CPU time per phase)")
    ap.add_argument("--dump-ir", help="write the compiled kernels' ttgir/ptx to this folder")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, TRITON_INTERPRET=1: family rows on tiny shapes (checks the script; times meaningless)")
    args = ap.parse_args()
    fams = args.families.split(",") if args.families else None
    if args.smoke:
        rows = run_families(None, not args.no_reference, min(args.moe_experts, 2),
                            shapes=[("tiny", 32, 64, 1)], dev="cpu", families=fams)
        print_families(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": "cpu (interpreter)", "families": rows}, f, indent=1)
        return
    dev_name = torch.cuda.get_device_name()
    print(dev_name, "torch", torch.__version__, "triton", triton.__version__)
    if args.host:
        print_overhead(host_overhead("1024x4096", 1024, 4096) + host_overhead("4096x4096", 4096, 4096))
        return
    mo = load_modelopt()
    if mo is not None:  # warm up (first use may compile)
        w, h = make_case(256, 256)
        mo.nvfp4_fp8_scale_sweep_hessian(w.reshape(-1, 16), w.float().abs().amax(), h, block_size=16)
    rows, variants, families = [], [], []
    if not args.no_families:
        families = run_families(mo, not args.no_reference, args.moe_experts, families=fams)
    for i, (name, cout, cin, _) in enumerate(SHAPES if not args.families_only else []):
        w, h, g = run_shape(name, cout, cin, mo, not args.no_reference, rows)
        if args.variants and i == 0:
            variants = run_variants(w, h, g)
    if not args.families_only:
        run_moe(mo, rows)
    overhead = []
    if args.variants:
        overhead = host_overhead("1024x4096", 1024, 4096) + host_overhead("4096x4096", 4096, 4096)
    if args.dump_ir:
        dump_ir(args.dump_ir)
    totals = {}
    for method in ("mse", "local_hessian"):
        for key in ("fp4cal_ms", "modelopt_ms"):
            vals = [r[method].get(key) for r in rows[: len(SHAPES)]]
            if len(vals) == len(SHAPES) and all(v is not None for v in vals):  # not under --families-only
                totals[f"{method}_{key}"] = sum(v * c * LAYERS for v, (_, _, _, c) in zip(vals, SHAPES, strict=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev_name, "rows": rows, "variants": variants, "overhead": overhead,
                       "totals_ms": totals, "families": families}, f, indent=1)
    if variants:
        print("\nvariants (kernel + host prep, 4096x4096):")
        for name, br, nw, t in variants:
            print(f"  {name:40s} BR={br:4d} warps={nw}  {t:7.3f} ms")
    print_overhead(overhead)
    print(f"\n{'shape':22s} {'method':6s} {'ref ms':>8s} {'fp4cal':>8s} {'ModelOpt':>9s} {'MO/ours':>8s} "
          f"{'ref/ours':>8s} {'Gw/s':>6s} {'floor':>7s}  parity(ref)              parity(ModelOpt)")
    for r in rows:
        for method, tag in (("mse", "mse"), ("local_hessian", "hess")):
            m = r[method]
            mo_ms, ours = m.get("modelopt_ms"), m["fp4cal_ms"]
            print(f"{r['shape']:22s} {tag:6s} {fmt(m.get('ref_ms'), '8.1f'):>8s} {ours:8.3f} "
                  f"{fmt(mo_ms, '9.3f'):>9s} {fmt(mo_ms / ours if mo_ms else None, '8.2f'):>8s} "
                  f"{fmt(m['ref_ms'] / ours if 'ref_ms' in m else None, '8.0f'):>8s} {m['gw_per_s']:6.1f} "
                  f"{m['floor_ms']:7.3f}  {m.get('parity_ref', '-'):24s} {m.get('parity_modelopt', '-')}")
    if families:
        print_families(families)
    for k, v in totals.items():
        print(f"whole Qwen3-8B ({LAYERS} layers) {k}: {v / 1e3:.3f} s")
    for method in ("mse", "local_hessian"):
        a, b = totals.get(f"{method}_modelopt_ms"), totals.get(f"{method}_fp4cal_ms")
        if a and b:
            print(f"whole Qwen3-8B {method}: ModelOpt / fp4cal = {a / b:.2f}x")


if __name__ == "__main__":
    main()
