# Helper "search3" (2026-11-30): offline sm_90 compile of the sweep kernels for instruction counts (no GPU needed).
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, "src")
from fp4cal.search.sweep_rows import _rescore_kernel, _sweep_rows_kernel

k = _sweep_rows_kernel
sig = {}
names = k.arg_names
ptrs = {
    "w_ptr": "*bf16",
    "g_ptr": "*fp32",
    "v_ptr": "*fp32",
    "s_tab_ptr": "*fp32",
    "r_tab_ptr": "*fp32",
    "f_ptr": "*fp32",
    "mu_ptr": "*fp32",
    "nu_ptr": "*fp32",
    "rd_ptr": "*fp32",
    "rank_ptr": "*i32",
    "h_ptr": "*fp32",
    "nohalf_ptr": "*i32",
    "out_ptr": "*fp32",
    "stats_ptr": "*i32",
    "loss_ptr": "*i32",
    "cnt_ptr": "*i32",
    "list_ptr": "*i32",
}
const = dict(HESSIAN=True, STATS=False, BR=32, FUSED=False, LOSSES=False, EXACT=sys.argv[1] == "1", UNROLL=2)
for n in names:
    if n in ptrs:
        sig[n] = ptrs[n]
    elif n in const:
        sig[n] = "constexpr"
    else:
        sig[n] = "i32"
src = ASTSource(fn=k, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
t = time.time()
ck = triton.compile(
    src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1, maxnreg=168, enable_fp_fusion=False)
)
print("compile s", time.time() - t)
open(f"/tmp/s3/sweep{sys.argv[1]}.ptx", "w").write(ck.asm["ptx"])
if "sass" in ck.asm:
    open(f"/tmp/s3/sweep{sys.argv[1]}.sass", "w").write(ck.asm["sass"])
print(ck.asm.keys(), ck.metadata.get("n_regs") if isinstance(ck.metadata, dict) else getattr(ck, "n_regs", None))
open(f"/tmp/s3/sweep{sys.argv[1]}.cubin", "wb").write(ck.asm["cubin"])

k2 = _rescore_kernel
names2 = k2.arg_names
ptrs2 = {
    "w_ptr": "*bf16",
    "g_ptr": "*fp32",
    "v_ptr": "*fp32",
    "s_tab_ptr": "*fp32",
    "r_tab_ptr": "*fp32",
    "h_ptr": "*fp32",
    "cnt_ptr": "*i32",
    "list_ptr": "*i32",
    "out_ptr": "*fp32",
    "loss_ptr": "*fp64",
}
const2 = dict(BR=32, LOSSES=False)
sig2 = {n: ptrs2.get(n, "constexpr" if n in const2 else "i32") for n in names2}
t = time.time()
ck2 = triton.compile(
    ASTSource(fn=k2, signature=sig2, constexprs={(names2.index(n),): v for n, v in const2.items()}),
    target=GPUTarget("cuda", 90, 32),
    options=dict(num_warps=1, enable_fp_fusion=False),
)
print("rescore compile s", time.time() - t)
open("/tmp/s3/rescore.cubin", "wb").write(ck2.asm["cubin"])
