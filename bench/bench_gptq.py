"""GPTQ time on a Qwen3-8B-shaped model: fp4cal method='gptq' end to end with a breakdown, per scale variant,
beside ModelOpt's layerwise NVFP4 GPTQ (fused kernel) in the same process, both warmed up before timing.

Set-up (as ../shared/tools/modelopt_layerwise_bench.py): a randomly initialized Qwen3 model with Qwen3-8B's
layer shapes (hidden 4096, intermediate 12288, 32 heads, 8 kv heads, head_dim 128, vocab 151936), 4 decoder
layers, bf16, resident on one GPU, 128 samples x 2048 random token ids, batch 8. Rows of the table:

    per variant (--variants, default local_hessian, local_hessian_dynamic, max):
      warm-up calibrate         calibrate on one batch first (CUDA start, Triton compilation of that variant)
      fp4cal gptq end to end    calibrate(model, batches, 'gptq', gptq_scales=variant) from scratch (all the
                                variants' end to end runs come first, so that their peaks are their own)
    forwards (no capture)       one pass over the data with logits_to_keep=1, no capture (shared by all variants)
    Hessian capture             capture_statistics(full_hessians=True) minus the plain forwards (shared)
    per variant, on those statistics:
      factor (damp, Cholesky)   per weight: validation, damping, Cholesky of H, its inverse, Cholesky of that
      scale search              per weight: the static block scales (none for the dynamic variant)
      column loop               per weight: the GPTQ loop (Triton kernel per 128-column block + lazy GEMMs;
                                dynamic: the group scale searches inside the kernel)
      losses                    per weight: tr(dW H dW^T) for max scales and for GPTQ (reporting only)
    ModelOpt first call         mtq.quantize with {'method': 'gptq', 'fused': True, 'layerwise': enabled} on a
                                1-layer copy and --modelopt-warmup-samples samples: its CUDA extension build and
                                first-call costs (what fp4cal's warm-up calibrate pays for fp4cal)
    ModelOpt warm               the same on the full model, after that first call

ModelOpt's GPTQ rounds with max block scales: 'gptq (max)' is the like-for-like row, the others add fp4cal's
scale searches. A final table gives ModelOpt warm / fp4cal end to end per variant. ModelOpt is run only as a
comparison (it must be importable: see COMMON.md for the wheels); --no-modelopt skips it.
--tiny: a 2-layer toy model on the CPU (or GPU) in seconds, to test this script itself.
Usage: python bench/bench_gptq.py [--json PATH] [--variants local_hessian,max] [--layers 4] [--no-breakdown]
       [--tiny] [--no-modelopt]
(About 150 s on an H200 with every row, ModelOpt's extension build included; --no-breakdown and fewer
--variants shorten it.)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from fp4cal.calib.calibrate import calibrate, calibration_forward_kwargs, group_global_amax  # noqa: E402
from fp4cal.calib.capture import capture_statistics, run_batch  # noqa: E402
from fp4cal.calib.targets import find_targets  # noqa: E402
from fp4cal.gptq import SCALES, GPTQConfig, gptq_round, layer_objective  # noqa: E402
from fp4cal.numerics import fake_quantize  # noqa: E402
from timing import timed  # noqa: E402 - bench/timing.py, beside this script


def build(args, device):
    from transformers import AutoModelForCausalLM, Qwen3Config

    if args.tiny:
        cfg = Qwen3Config(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=args.seq)
    else:
        cfg = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=args.layers,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          max_position_embeddings=args.seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval(), cfg


def peak(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


Row = tuple[str, float, str]


def show(rows: list[Row]) -> list[Row]:
    """Print rows as they are measured (a run cut short by its time limit keeps what it had), return them."""
    for label, sec, note in rows:
        print(f"  [{label}]  {sec:.2f} s  {note}", flush=True)
    return rows


def fp4cal_rows(args, device, ids) -> tuple[list[Row], dict[str, float]]:
    """Shared forward/capture rows, then each variant's warm-up, end to end and breakdown; also returns the end
    to end seconds per variant."""
    model, _ = build(args, device)
    batches = [ids[i : i + args.batch] for i in range(0, args.samples, args.batch)]
    targets, _ = find_targets(model)
    extra = calibration_forward_kwargs(model, targets)

    def forwards():
        with torch.no_grad():
            for b in batches:
                run_batch(model, b, device, extra)

    rows: list[Row] = []
    e2e: dict[str, float] = {}
    for scales in args.variants:  # every end to end run before the statistics below exist (clean peaks)
        kw = dict(method="gptq", gptq_scales=scales, gptq_damp=args.damp, progress=False)
        _, t_warm = timed(lambda: calibrate(model, batches[:1], **kw), device)  # noqa: B023
        reset_peak(device)
        res, t_e2e = timed(lambda: calibrate(model, batches, **kw), device)  # noqa: B023
        p_e2e = peak(device)
        del res
        gc.collect()
        e2e[scales] = t_e2e
        rows += show([(f"warm-up calibrate, 1 batch ({scales})", t_warm, ""),
                      (f"fp4cal gptq ({scales}) end to end", t_e2e, f"peak {p_e2e:.1f} GiB")])
    if args.no_breakdown:
        return rows, e2e
    _, t_fwd = timed(forwards, device)
    stats, t_cap = timed(lambda: capture_statistics(model, batches, targets, full_hessians=True,
                                                    extra_kwargs=extra), device)
    rows += show([("forwards (no capture)", t_fwd, "shared by the variants"),
                  ("Hessian capture", t_cap - t_fwd, f"capture pass {t_cap:.2f} s")])
    amax = group_global_amax(targets)
    for scales in args.variants:
        gcfg = GPTQConfig(scales, args.damp)
        phases: dict[str, float] = {}
        t_loss = 0.0
        for t in targets:
            w = t.weight()
            h = stats.inputs[t.module_name].full.normalized()
            out = gptq_round(w, h, amax[t.name], gcfg, timings=phases)
            _, dt = timed(lambda: (layer_objective(w, fake_quantize(w, None, amax[t.name], torch.float32), h),  # noqa: B023
                                   layer_objective(w, out.weight, h)), device)  # noqa: B023
            t_loss += dt
        rows += show([
            (f"  {scales}: factor (damp, Cholesky)", phases.get("factor", 0.0), f"{len(targets)} weights"),
            (f"  {scales}: scale search", phases.get("scales", 0.0), ""),
            (f"  {scales}: column loop", phases.get("column loop", 0.0), ""),
            (f"  {scales}: losses (reporting)", t_loss, ""),
        ])
    return rows, e2e  # the model and statistics are freed with this frame


def modelopt_rows(args, device, ids) -> tuple[list[Row], dict[str, float]]:
    """ModelOpt's fused layerwise GPTQ: a first call on a 1-layer copy (extension build, first-call costs),
    then the timed run on the full model. Returns the rows and {'first': s, 'warm': s} (NaN if not run)."""
    nan = float("nan")
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        return [("ModelOpt gptq fused", nan, f"not run: {e}")], {"first": nan, "warm": nan}
    version = getattr(sys.modules.get("modelopt"), "__version__", "?")
    qcfg = copy.deepcopy(mtq.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG)
    qcfg["algorithm"] = {"method": "gptq", "fused": True, "layerwise": {"enable": True}}

    def run(layers: int, samples: int) -> tuple[float, str]:
        model, _ = build(argparse.Namespace(**{**vars(args), "layers": layers}), device)

        def loop(m):
            with torch.no_grad():
                for i in range(0, samples, args.batch):
                    m(ids[i : i + args.batch].to(device))

        reset_peak(device)
        try:
            _, t = timed(lambda: mtq.quantize(model, qcfg, loop), device)
        except Exception as e:  # noqa: BLE001 - a comparison that fails is reported, not fatal
            return nan, f"failed: {type(e).__name__}: {str(e)[:200]}"
        return t, f"peak {peak(device):.1f} GiB"  # the model is freed with this frame

    warm_samples = min(args.modelopt_warmup_samples, args.samples)
    t_first, n_first = run(1, warm_samples)
    show([("ModelOpt first call", t_first, n_first)])
    gc.collect()
    reset_peak(device)
    t_warm, n_warm = run(args.layers, args.samples)
    rows = [(f"ModelOpt {version} gptq fused, first call (1 layer, {warm_samples} samples)", t_first,
             f"extension build + first call; {n_first}"),
            (f"ModelOpt {version} gptq layerwise fused, warm", t_warm, n_warm)]
    return rows, {"first": t_first, "warm": t_warm}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", default="local_hessian,local_hessian_dynamic,max",
                    help="comma-separated gptq_scales to time (default: %(default)s)")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--no-breakdown", action="store_true", help="end to end rows only (no per-phase rerun)")
    ap.add_argument("--modelopt-warmup-samples", type=int, default=8,
                    help="samples of ModelOpt's untimed first call on a 1-layer copy (default: %(default)s)")
    ap.add_argument("--tiny", action="store_true", help="2-layer toy model, 4 x 32 tokens (tests the script)")
    ap.add_argument("--no-modelopt", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in SCALES]
    if bad or not args.variants:
        ap.error(f"--variants must be a comma-separated subset of {SCALES}, got {bad or args.variants}")
    if args.tiny:
        args.samples, args.seq, args.batch = 4, 32, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("bench_gptq: no CUDA device; use --tiny to test the script on the CPU", file=sys.stderr)
        return 2
    vocab = 256 if args.tiny else 151936
    ids = torch.randint(0, vocab, (args.samples, args.seq), generator=torch.Generator().manual_seed(0))
    rows, e2e = fp4cal_rows(args, device, ids)
    mo = {"first": float("nan"), "warm": float("nan")}
    if not args.no_modelopt:
        mo_rows, mo = modelopt_rows(args, device, ids)
        rows += mo_rows
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench_gptq: {'tiny' if args.tiny else f'{args.layers} Qwen3-8B-shaped layers'}, "
          f"{args.samples} x {args.seq} tokens, batch {args.batch}, bf16, {name}")
    width = max(len(r[0]) for r in rows)
    for label, sec, note in rows:
        print(f"{label:<{width}}  {sec:8.2f} s  {note}")
    ratios = []
    print(f"{'fp4cal gptq scales':<24}{'end to end':>12}{'ModelOpt warm / fp4cal':>25}{'first call / fp4cal':>22}")
    for scales, t in e2e.items():
        r_warm, r_first = mo["warm"] / t, mo["first"] / t
        ratios.append({"scales": scales, "fp4cal_s": t, "modelopt_warm_over_fp4cal": r_warm,
                       "modelopt_first_over_fp4cal": r_first})
        print(f"{scales:<24}{t:>10.2f} s{r_warm:>24.2f}x{r_first:>21.2f}x")
    if args.json:
        payload = {"rows": rows, "ratios": ratios, "modelopt": mo, "device": name, "args": vars(args)}
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
