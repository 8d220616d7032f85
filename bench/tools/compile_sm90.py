# Helpers "search3"/"search4" (2026-11-30): offline sm_90 compile of the search kernels (no GPU needed): compile time
# (fresh Triton cache), registers, stack/spill bytes and SASS instruction counts, for reading what a change costs.
#   python bench/tools/compile_sm90.py [--exact 0|1] [--rescore-br 16] [--rescore-warps 4] [--out /tmp/s3]
# Helper "kvslow": --prep also compiles kernels._prep_kernel as search_triton launches it on a local-Hessian call
# (FACTOR, no value scan, 4 warps), the per-call Hessian factor that every call without factor= runs.
import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-sm90-"))  # compile times without cache
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SRC = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else "src"  # another checkout's sources
sys.path.insert(0, SRC)
from fp4cal.search import sweep_rows  # noqa: E402

try:  # the float64 pass has its own module since the eighth session
    from fp4cal.search import rescore as rescore_mod  # noqa: E402
except ImportError:
    rescore_mod = sweep_rows

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# what the JIT specializes on the bench's shapes: 16-byte-aligned pointers and multiples of 16 ("tt.divisibility"
# 16), the unit column stride as the constant 1
ALIGNED_INTS = ("cap", "cout", "nb", "chunk", "stride_we", "stride_wr", "stride_fe", "stride_oe", "n_hb", "n_rows",
                "cin")
PTRS = {"w_ptr": "*bf16", "rank_ptr": "*i32", "nohalf_ptr": "*i32", "stats_ptr": "*i32", "cnt_ptr": "*i32",
        "list_ptr": "*i32", "oi_ptr": "*i32", "loss_ptr": "*fp64", "flag_ptr": "*i32", "status_ptr": "*i32"}


def compile_one(kernel, const, options, out, tag):
    names = kernel.arg_names
    const = {n: v for n, v in const.items() if n in names}  # an older kernel may lack some
    const = dict(const, **({"stride_wc": 1} if "stride_wc" in names else {}))
    sig = {n: "constexpr" if n in const else PTRS.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in const and (n.endswith("_ptr") or n in ALIGNED_INTS)}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs=attrs)
    t = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    secs = time.time() - t
    base = os.path.join(out, tag)
    for ext in ("ttgir", "ptx"):
        with open(f"{base}.{ext}", "w") as f:
            f.write(ck.asm[ext])
    with open(f"{base}.cubin", "wb") as f:
        f.write(ck.asm["cubin"])
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f"{base}.cubin"],
                           capture_output=True, text=True).stdout
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f"{base}.cubin"], capture_output=True,
                          text=True).stdout
    with open(f"{base}.sass", "w") as f:
        f.write(sass)
    n_ins = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M))
    res = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    spill = "spill" if re.search(r"\bSTL\b", sass) else "no spill stores"
    print(f"{tag:24s} compile {secs:6.2f} s  regs {res.group(1)}  stack {res.group(2)} B  {spill}  "
          f"SASS {n_ins} instructions ({sum(1 for _ in re.finditer(r'DFMA|DADD|DMUL', sass))} fp64)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exact", type=int, default=None, help="sweep EXACT (default: both)")
    ap.add_argument("--rescore-br", type=int, default=32)
    ap.add_argument("--rescore-warps", type=int, default=1)
    ap.add_argument("--out", default="/tmp/s3")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--src", default="src", help="the sources to compile (e.g. an older commit's, extracted)")
    ap.add_argument("--prep", action="store_true", help="also the prep kernel (tables + Hessian factor, 4 warps)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for old in glob.glob(os.path.join(args.out, "*.cubin")):
        os.remove(old)
    if args.prep:
        from fp4cal.search import kernels

        # search_triton's launch on one 2-D weight: n_e = 1 (the JIT makes it the constant 1, as stride_wc)
        const = dict(n_e=1, FACTOR=True, SCAN=False, SR=16, SC=128, SL=4)
        compile_one(kernels._prep_kernel, const, dict(num_warps=4, enable_fp_fusion=True), args.out, "prep_factor")
    if not args.no_sweep:
        for exact in ([args.exact] if args.exact is not None else [0, 1]):
            from fp4cal.search import kernels

            # the launch settings of search_triton (kernels.py), where the sources have them
            refill = getattr(kernels, "_REFILL_LANES", 8)
            maxnreg = getattr(kernels, "_MAXNREG_HESSIAN", 168)
            const = dict(HESSIAN=True, STATS=False, BR=32, FUSED=False, LOSSES=False, EXACT=bool(exact),
                         UNROLL=getattr(kernels, "_UNROLL", 2), REFILL=refill)
            if hasattr(kernels, "_BOX_EVERY"):  # since the tenth session (older sweeps take their default)
                const["BOX_EVERY"] = kernels._BOX_EVERY
            compile_one(sweep_rows._sweep_rows_kernel, const,
                        dict(num_warps=1, maxnreg=maxnreg, enable_fp_fusion=False), args.out, f"sweep_exact{exact}")
    if not hasattr(rescore_mod, "_rescore_kernel"):
        return
    const = dict(BR=args.rescore_br, LOSSES=False, STATS=False)
    compile_one(rescore_mod._rescore_kernel, const, dict(num_warps=args.rescore_warps, enable_fp_fusion=False),
                args.out, f"rescore_br{args.rescore_br}_w{args.rescore_warps}")


if __name__ == "__main__":
    main()
