"""Kernel parity on real GPUs at the Qwen3-8B linear shapes (run on the device machine: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from fp4cal.numerics import scale_candidates
from fp4cal.search.kernels import search_triton
from fp4cal.search.parity import compare_picks
from fp4cal.search.reference import search_reference
from fp4cal.validation import check_global_amax
from kernel_cases import (
    ILL_CONDITIONED,
    check_mode2_filter,
    make_hessian,
    make_ill_hessian,
    make_weight,
    mode2_steps,
    near_tie_blocks,
    with_antisymmetric_part,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

QWEN3_8B = [(4096, 4096), (1024, 4096), (12288, 4096), (4096, 12288)]


def _check(w, g_arg, method, h, label, exact=True, ref=None):
    g = check_global_amax(g_arg, w)
    got = search_triton(w, method, g, h, exact=exact)
    ref = search_reference(w, method, g, h) if ref is None else ref
    # every output is exactly one of the 126 candidates, bit for bit as numerics.scale_candidates makes them
    assert bool(torch.isin(got, scale_candidates(g)).all()), f"{label}: an output is not a candidate amax"
    rep = compare_picks(w, g, got, ref, h if method == "local_hessian" else None)
    print(f"PARITY {label}: {rep.differing} differing of {rep.blocks}, {rep.ties} float64 ties")
    assert rep.bad == 0, f"{label}: {rep.bad} picks differ beyond ties (worst {rep.worst_rel_gap:.3e})"


@pytest.mark.parametrize("shape", QWEN3_8B)
@pytest.mark.parametrize("method", ["mse", "local_hessian"])
def test_qwen3_shapes_bf16(shape, method):
    cout, cin = shape
    w, g = make_weight("outliers", cout, cin, torch.bfloat16, "cuda", seed=cout + cin)
    h = make_hessian("psd", cin, "cuda", seed=1, tokens=2048) if method == "local_hessian" else None
    _check(w, g, method, h, f"{method} {cout}x{cin} bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "heavy", "threshold", "zeros"])
def test_weight_kinds(kind, dtype):
    w, g = make_weight(kind, 1024, 4096, dtype, "cuda", seed=7)
    _check(w, g, "mse", None, f"mse {kind} {dtype}")
    h = make_hessian("psd", 4096, "cuda", seed=8)
    _check(w, g, "local_hessian", h, f"hessian {kind} {dtype}")


@pytest.mark.parametrize("hkind", ["diag", "lowrank", "zero", "range"])
def test_hessian_kinds(hkind):
    w, g = make_weight("outliers", 1024, 4096, torch.bfloat16, "cuda", seed=9)
    _check(w, g, "local_hessian", make_hessian(hkind, 4096, "cuda", seed=10), f"hessian {hkind}")


@pytest.mark.parametrize("shape", QWEN3_8B)
@pytest.mark.parametrize("hkind", ["rank1", "rank2", "deadchan"])
def test_rank_deficient_exact_on_qwen3_shapes(shape, hkind):
    """Issue 13.2: rank-1, rank-2 and zero-channel block Hessians, 0 non-tie differences from the float64 brute
    force on every Qwen3-8B shape with the default call (the blocks whose fp32 order may be wrong decided in
    float64 by the second launch); the fp32 picks alone (exact=False) are printed beside, for the record."""
    cout, cin = shape
    w, g = make_weight("outliers", cout, cin, torch.bfloat16, "cuda", seed=cout + 3 * cin)
    h = make_ill_hessian(hkind, cin, "cuda", seed=31)
    gg = check_global_amax(g, w)
    ref = search_reference(w, "local_hessian", gg, h)
    rep32 = compare_picks(w, gg, search_triton(w, "local_hessian", gg, h, exact=False), ref, h)
    print(f"PARITY fp32 picks alone, hessian {hkind} {cout}x{cin}: {rep32.differing} differing, {rep32.ties} ties, "
          f"{rep32.bad} bad")
    _check(w, g, "local_hessian", h, f"hessian {hkind} {cout}x{cin}", ref=ref)
    # the float64 pass's fp32 filter (rescore.py): sound on every mode-2 block, and it drops most of the windows
    rstats = torch.zeros(8 + 5 * w.numel() // 16, dtype=torch.int32, device="cuda")
    got = search_triton(w, "local_hessian", gg, h, rescore_stats=rstats)
    assert compare_picks(w, gg, got, ref, h).bad == 0
    n2, window, kept = check_mode2_filter(w, gg, h, rstats)
    c = rstats[:5].tolist()
    print(f"PARITY filter, hessian {hkind} {cout}x{cin}: mode 2 {n2} blocks, {window} window candidates, {kept} kept, "
          f"float64 steps {c[3]}, fp32 steps {c[4]}, longest chain {int(rstats[5])} (one block per warp)")
    assert (n2, window, kept) == tuple(c[:3])
    assert mode2_steps(rstats) == (c[4], c[3]) and int(rstats[5]) <= c[3] + c[4]
    if hkind == "rank1":
        assert n2 > 0 and kept < window / 2


def test_near_ties_on_gpu():
    """Rank-1 blocks whose candidates fp32 cannot order (kernel_cases.near_tie_blocks): float64 picks."""
    w, h, g = near_tie_blocks(64, seed=0)
    _check(w.cuda(), g.cuda(), "local_hessian", h.cuda(), "hessian near ties 64 blocks")
    # H not symmetric: the float64 pass reads such blocks from memory (rescore._quad64_any)
    _check(w.cuda(), g.cuda(), "local_hessian", with_antisymmetric_part(h, seed=1).cuda(),
           "hessian near ties 64 blocks, H not symmetric")


def test_not_symmetric_rank1_on_gpu():
    w, g = make_weight("normal", 1024, 4096, torch.float32, "cuda", seed=33)
    h = with_antisymmetric_part(make_ill_hessian("rank1", 4096, "cuda", seed=34), seed=2)
    _check(w, g, "local_hessian", h, "hessian rank1 + antisymmetric part 1024x4096 f32")


@pytest.mark.parametrize("hkind", ILL_CONDITIONED)
def test_ill_conditioned_families(hkind):
    w, g = make_weight("normal", 1024, 4096, torch.float32, "cuda", seed=33)
    _check(w, g, "local_hessian", make_ill_hessian(hkind, 4096, "cuda", seed=34), f"hessian {hkind} 1024x4096 f32")


def test_not_psd_refused_and_zero_blocks_fall_back_on_gpu():
    import fp4cal

    w, g = make_weight("normal", 256, 1024, torch.bfloat16, "cuda", seed=35)
    h = make_hessian("psd", 1024, "cuda", seed=36)
    bad = h.clone()
    bad[5] = -bad[5]
    with pytest.raises(ValueError, match=r"hessian block \(5,\) .*not positive semi-definite"):
        fp4cal.search_scales(w, "local_hessian", bad, backend="triton")
    dead = make_ill_hessian("deadblock", 1024, "cuda", seed=37)
    got = fp4cal.search_scales(w, "local_hessian", dead, backend="triton")
    assert torch.equal(got, fp4cal.search_scales(w, "local_hessian", dead, backend="torch"))


def test_moe_stack_beyond_int32_offsets():
    # 128 experts x 1536 x 12288 = 2.4e9 elements > 2^31: the last expert's last rows exercise 64-bit offsets.
    n_e, cout, cin = 128, 1536, 12288
    w = torch.empty(n_e, cout, cin, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
    g = w.abs().amax(dim=(1, 2)).float()
    h = make_hessian("psd", cin, "cuda", seed=11, tokens=1024)
    out = search_triton(w, "local_hessian", g, h)
    for e in (0, n_e - 1):
        rows = slice(cout - 64, cout)
        ref = search_reference(w[e, rows], "local_hessian", g[e], h)
        rep = compare_picks(w[e, rows], g[e], out[e, rows], ref, h)
        print(f"PARITY moe expert {e}: {rep.differing} differing of {rep.blocks}, {rep.ties} ties")
        assert rep.bad == 0


@pytest.mark.parametrize("method", ["mse", "local_hessian"])
def test_picks_against_modelopt(method):
    """Where ModelOpt 0.47 is importable: every block where its pick differs from fp4cal's is a float64 tie
    or one where fp4cal's pick has the lower float64 loss (fp4cal matches the float64 reference)."""
    mo = pytest.importorskip("modelopt.torch.kernels.quantization.gemm.nvfp4_fp8_sweep")
    cout, cin = 1024, 4096
    w, g = make_weight("outliers", cout, cin, torch.bfloat16, "cuda", seed=21)
    g = check_global_amax(g, w)
    h = make_hessian("psd", cin, "cuda", seed=22) if method == "local_hessian" else None
    ours = search_triton(w, method, g, h)
    xb = w.reshape(-1, 16)
    if method == "mse":
        theirs = mo.nvfp4_fp8_scale_sweep(xb, g, block_size=16)
    else:
        theirs = mo.nvfp4_fp8_scale_sweep_hessian(xb, g, h, block_size=16)
    theirs = theirs.float().reshape(cout, cin // 16)
    rep = compare_picks(w, g, ours, theirs, h)
    from fp4cal.search.parity import pick_losses

    lo, lt = pick_losses(w, g, ours, h), pick_losses(w, g, theirs, h)
    worse = int((lo > lt * (1 + 1e-6)).sum())
    print(f"PARITY vs ModelOpt {method}: {rep.differing} differ, {rep.ties} ties, fp4cal worse on {worse}")
    assert worse == 0


def test_fast_launch_matches_jit_and_skips_it(monkeypatch):
    """fp4cal.search.launch: picks bit for bit as through the JIT's launch, for an aligned and an unaligned weight
    (two specializations of the sweep), and once a specialization has run, its launches bypass the JIT's run."""
    from fp4cal.search import launch
    from fp4cal.search.sweep_rows import _sweep_rows_kernel

    if not launch.ENABLED:
        pytest.skip(f"fast launch off for Triton {launch.triton.__version__} (or FP4CAL_FAST_LAUNCH=0)")
    w, g = make_weight("outliers", 1024, 4096, torch.bfloat16, "cuda", seed=11)
    buf = torch.empty(w.numel() + 4, dtype=w.dtype, device="cuda")
    wu = buf[4:].view_as(w)  # 8 bytes past a 16-byte boundary
    wu.copy_(w)
    assert wu.data_ptr() % 16 == 8
    h = make_ill_hessian("rank1", 4096, "cuda", seed=2)
    gg = check_global_amax(g, w)
    for method, hh in (("mse", None), ("local_hessian", h)):
        monkeypatch.setattr(launch, "ENABLED", False)
        want = [search_triton(x, method, gg, hh) for x in (w, wu)]
        monkeypatch.setattr(launch, "ENABLED", True)
        for _ in range(2):  # the first call may fill the cache through the JIT; the second launches directly
            got = [search_triton(x, method, gg, hh) for x in (w, wu)]
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b), f"{method}: fast launch picks differ from the JIT's"
    runs = []
    jit_run = _sweep_rows_kernel.run
    monkeypatch.setattr(_sweep_rows_kernel, "run", lambda *a, **k: runs.append(1) or jit_run(*a, **k))
    got = search_triton(wu, "local_hessian", gg, h)
    assert torch.equal(got, want[1]) and not runs, f"the sweep went through the JIT's run {len(runs)} time(s)"
    assert len(launch._CACHE[id(_sweep_rows_kernel)]) >= 2  # aligned and unaligned weight: two specializations
