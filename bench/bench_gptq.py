"""GPTQ time on a Qwen3-8B-shaped model: fp4cal method='gptq' end to end with a breakdown, beside ModelOpt's
layerwise NVFP4 GPTQ (fused kernel) in the same process.

Set-up (as ../shared/tools/modelopt_layerwise_bench.py): a randomly initialized Qwen3 model with Qwen3-8B's
layer shapes (hidden 4096, intermediate 12288, 32 heads, 8 kv heads, head_dim 128, vocab 151936), 4 decoder
layers, bf16, resident on one GPU, 128 samples x 2048 random token ids, batch 8. Rows of the table:

    fp4cal gptq end to end      calibrate(model, batches, 'gptq') from scratch (capture + GPTQ of 28 weights)
      forwards                  one pass over the data with logits_to_keep=1, no capture
      Hessian capture           capture_statistics(full_hessians=True) minus the plain forwards
      factor (damp, Cholesky)   per weight: validation, damping, Cholesky of H, its inverse, Cholesky of that
      scale search              per weight: local-Hessian block scales from H's 16x16 diagonal blocks
      column loop               per weight: the GPTQ loop (Triton kernel per 128-column block + lazy GEMMs)
      losses                    per weight: tr(dW H dW^T) for max scales and for GPTQ (reporting only)
    ModelOpt gptq fused         mtq.quantize with {'method': 'gptq', 'fused': True, 'layerwise': enabled}

A warm-up calibrate() on one batch runs first (CUDA start, Triton compilation). ModelOpt is run only as a
comparison (it must be importable: see COMMON.md for the wheels); --no-modelopt skips it.
--tiny: a 2-layer toy model on the CPU (or GPU) in seconds, to test this script itself.
Usage: python bench/bench_gptq.py [--json PATH] [--scales local_hessian] [--layers 4] [--tiny] [--no-modelopt]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from fp4cal.calib.calibrate import calibrate, calibration_forward_kwargs, group_global_amax  # noqa: E402
from fp4cal.calib.capture import capture_statistics, run_batch  # noqa: E402
from fp4cal.calib.targets import find_targets  # noqa: E402
from fp4cal.gptq import GPTQConfig, gptq_round, layer_objective  # noqa: E402
from fp4cal.numerics import fake_quantize  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


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


def fp4cal_rows(args, device, ids) -> list[tuple[str, float, str]]:
    model, _ = build(args, device)
    batches = [ids[i : i + args.batch] for i in range(0, args.samples, args.batch)]
    gcfg = GPTQConfig(args.scales, args.damp)
    kw = dict(method="gptq", gptq_scales=args.scales, gptq_damp=args.damp, progress=False)
    _, t_warm = timed(lambda: calibrate(model, batches[:1], **kw), device)
    reset_peak(device)
    res, t_e2e = timed(lambda: calibrate(model, batches, **kw), device)
    p_e2e = peak(device)
    del res
    gc.collect()

    targets, _ = find_targets(model)
    extra = calibration_forward_kwargs(model, targets)

    def forwards():
        with torch.no_grad():
            for b in batches:
                run_batch(model, b, device, extra)

    _, t_fwd = timed(forwards, device)
    stats, t_cap = timed(lambda: capture_statistics(model, batches, targets, full_hessians=True,
                                                    extra_kwargs=extra), device)
    amax = group_global_amax(targets)
    phases: dict[str, float] = {}
    t_loss = 0.0
    for t in targets:
        w = t.weight()
        h = stats.inputs[t.module_name].full.normalized()
        out = gptq_round(w, h, amax[t.name], gcfg, timings=phases)
        _, dt = timed(lambda: (layer_objective(w, fake_quantize(w, None, amax[t.name], torch.float32), h),  # noqa: B023
                               layer_objective(w, out.weight, h)), device)  # noqa: B023
        t_loss += dt
    rows = [
        ("warm-up calibrate (1 batch)", t_warm, ""),
        (f"fp4cal gptq end to end ({args.scales})", t_e2e, f"peak {p_e2e:.1f} GiB"),
        ("  forwards (no capture)", t_fwd, ""),
        ("  Hessian capture", t_cap - t_fwd, f"capture pass {t_cap:.2f} s"),
        ("  factor (damp, Cholesky)", phases.get("factor", 0.0), f"{len(targets)} weights"),
        ("  scale search", phases.get("scales", 0.0), ""),
        ("  column loop", phases.get("column loop", 0.0), ""),
        ("  losses (reporting)", t_loss, ""),
    ]
    return rows  # the model and statistics are freed with this frame


def modelopt_rows(args, device, ids) -> list[tuple[str, float, str]]:
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        return [("ModelOpt gptq fused", float("nan"), f"not run: {e}")]
    model, _ = build(args, device)
    qcfg = copy.deepcopy(mtq.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG)
    qcfg["algorithm"] = {"method": "gptq", "fused": True, "layerwise": {"enable": True}}

    def loop(m):
        with torch.no_grad():
            for i in range(0, args.samples, args.batch):
                m(ids[i : i + args.batch].to(device))

    reset_peak(device)
    try:
        _, t = timed(lambda: mtq.quantize(model, qcfg, loop), device)
    except Exception as e:  # noqa: BLE001 - a comparison that fails is reported, not fatal
        return [("ModelOpt gptq fused", float("nan"), f"failed: {type(e).__name__}: {str(e)[:200]}")]
    version = getattr(sys.modules.get("modelopt"), "__version__", "?")
    return [(f"ModelOpt {version} gptq layerwise fused", t, f"peak {peak(device):.1f} GiB")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--scales", default="local_hessian", help="gptq_scales (default: %(default)s)")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--tiny", action="store_true", help="2-layer toy model, 4 x 32 tokens (tests the script)")
    ap.add_argument("--no-modelopt", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    if args.tiny:
        args.samples, args.seq, args.batch = 4, 32, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("bench_gptq: no CUDA device; use --tiny to test the script on the CPU", file=sys.stderr)
        return 2
    vocab = 256 if args.tiny else 151936
    ids = torch.randint(0, vocab, (args.samples, args.seq), generator=torch.Generator().manual_seed(0))
    rows = fp4cal_rows(args, device, ids)
    if not args.no_modelopt:
        rows += modelopt_rows(args, device, ids)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench_gptq: {'tiny' if args.tiny else f'{args.layers} Qwen3-8B-shaped layers'}, "
          f"{args.samples} x {args.seq} tokens, batch {args.batch}, bf16, {name}")
    width = max(len(r[0]) for r in rows)
    for label, sec, note in rows:
        print(f"{label:<{width}}  {sec:8.2f} s  {note}")
    e2e = next(r[1] for r in rows if r[0].startswith("fp4cal gptq end to end"))
    mo = [r[1] for r in rows if r[0].startswith("ModelOpt") and r[1] == r[1]]
    if mo:
        print(f"ModelOpt fused / fp4cal: {mo[0] / e2e:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "device": name, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
