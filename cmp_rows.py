"""Row kernel vs tile kernel: parity against the reference, then interleaved timing. Temporary."""
import sys, torch, triton
sys.path.insert(0, "bench")
from bench_search import make_case, bench_rounds
from fp4cal.search import kernels as K
from fp4cal.search.parity import compare_picks
from fp4cal.search.reference import search_reference
print(torch.cuda.get_device_name())
for cout, cin in ((4096, 4096), (1024, 4096)):
    for seed in (1, 2):
        w, h = make_case(cout, cin, seed=seed)
        g = w.float().abs().amax()
        ref = search_reference(w, "local_hessian", g, h)
        for nw in (1, 2, 4):
            got = K.search_triton(w, "local_hessian", g, h, num_warps=nw)
            rep = compare_picks(w, g, got, ref, h)
            print(f"PARITY rows nw={nw} {cout}x{cin} seed {seed}: {rep.differing} differ, {rep.ties} ties, bad {rep.bad}")
        tile = K.search_triton(w, "local_hessian", g, h, layout="tile")
        rep = compare_picks(w, g, tile, ref, h)
        print(f"PARITY tile {cout}x{cin} seed {seed}: {rep.differing} differ, {rep.ties} ties, bad {rep.bad}")
    fns = {"tile": lambda: K.search_triton(w, "local_hessian", g, h, layout="tile")}
    for kw in ({"num_warps": 1}, {"num_warps": 2}, {"num_warps": 4}, {"num_warps": 1, "unroll": 4},
               {"num_warps": 2, "unroll": 4}, {"num_warps": 1, "maxnreg": 168}, {"num_warps": 2, "maxnreg": 128}):
        fns[f"rows {kw}"] = lambda kw=kw: K.search_triton(w, "local_hessian", g, h, **kw)
    t = bench_rounds(fns, rounds=3)
    for k, v in t.items():
        print(f"TIME {cout}x{cin} {k:40s} {v:.3f} ms  ({t['tile'] / v:.2f}x vs tile)")
    for nw in (1, 2, 4):
        br = 32 * nw
        s = torch.zeros(triton.cdiv(cout, br) * (cin // 16), 3, dtype=torch.int32, device="cuda")
        K.search_triton(w, "local_hessian", g, h, num_warps=nw, stats=s); s = s.double()
        print(f"STATS rows BR={br}: tiles {s[:, 0].mean():.1f}+{s[:, 1].mean():.1f}, need {s[:, 2].sum() / (w.numel() / 16):.1f}")
