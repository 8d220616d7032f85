"""End-to-end calibration time on a Qwen3-8B-shaped model, comparable with ModelOpt's figure in anchors.md.

Same set-up as ../shared/tools/modelopt_e2e_bench.py: a randomly initialized Qwen3 model with Qwen3-8B's layer
shapes (hidden 4096, intermediate 12288, 32 heads, 8 kv heads, head_dim 128, vocab 151936) and 4 decoder layers,
bf16 on one GPU, 128 samples x 2048 random token ids, batch 8. Timed phases (torch.cuda.synchronize around each):

    plain forward           one pass model(ids) over the data, full logits (ModelOpt's baseline row)
    plain forward, no logits  the same with logits_to_keep=1, which is what calibration runs (lm_head is
                            not quantized, so its [8, 2048, 151936] logits are not needed)
    forward + capture       capture_statistics: the one calibration pass (Hessians + activation amax)
    search                  solve: global amax, local-Hessian search of the 28 weights, losses
    total                   calibrate() end to end, a fresh run (targets + capture + search)

A warm-up calibrate() on one batch runs first (CUDA/cuBLAS start, Triton kernel compilation) and is reported
apart. Usage: python bench/bench_calibrate.py [--json PATH] [--method local_hessian] [--layers 4] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from fp4cal.calib.calibrate import calibrate, calibration_forward_kwargs, solve  # noqa: E402
from fp4cal.calib.capture import capture_statistics, run_batch  # noqa: E402
from fp4cal.calib.targets import find_targets  # noqa: E402
from fp4cal.search import choose_backend  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def build_model(layers: int, seq: int):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=seq)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialize on the GPU: same init distribution, seconds instead of a minute
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval(), cfg


def search_kernel_times(fn) -> dict[str, float]:
    """Device seconds of the kernels fn() runs, from torch.profiler's CUDA activity: the search's own kernels
    (fp4cal's prep, factor and sweep) and every GPU kernel of the call (losses, casts, ...)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ours = total = 0.0
    for ev in prof.key_averages():
        if "CUDA" not in str(getattr(ev, "device_type", "")):
            continue  # CPU-side op records carry their kernels' time too: count the kernels themselves only
        t = getattr(ev, "device_time_total", None)
        t = ev.cuda_time_total if t is None else t
        total += t
        if ev.key.startswith(("_sweep_rows_kernel", "_prep_kernel", "_factor_kernel")):
            ours += t
    return {"search kernels": ours / 1e6, "all GPU kernels": total / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=int(os.environ.get("LAYERS", "4")))
    ap.add_argument("--samples", type=int, default=int(os.environ.get("SAMPLES", "128")))
    ap.add_argument("--seq", type=int, default=int(os.environ.get("SEQ", "2048")))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--method", default="local_hessian", choices=("local_hessian", "mse", "max"))
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_calibrate.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers

    model, cfg = build_model(args.layers, args.seq)
    ids = torch.randint(0, cfg.vocab_size, (args.samples, args.seq))
    batches = list(ids.split(args.batch))  # on the CPU; each forward moves its batch, as ModelOpt's loop does
    device = torch.device("cuda")
    targets, _ = find_targets(model)
    extras = calibration_forward_kwargs(model, targets)

    def forward_pass(extra):
        with torch.no_grad():
            for b in batches:
                run_batch(model, b, device, extra)

    _, t_warm = timed(lambda: calibrate(model, batches[:1], args.method))
    _, t_fwd = timed(lambda: forward_pass(None))
    _, t_fwd_trim = timed(lambda: forward_pass(extras))
    stats, t_capture = timed(lambda: capture_statistics(model, batches, targets, args.method == "local_hessian",
                                                         extras))
    _, t_search = timed(lambda: solve(targets, stats, args.method))
    kern = search_kernel_times(lambda: solve(targets, stats, args.method))
    stats = None  # free the Hessians before the end-to-end run
    result, t_total = timed(lambda: calibrate(model, batches, args.method))
    loss_max = sum(w.loss_max for w in result.weights.values())
    loss_chosen = sum(w.loss_chosen for w in result.weights.values())
    w0 = targets[0].weight()
    numbers = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "layers": args.layers, "samples": args.samples, "seq": args.seq, "batch": args.batch,
        "method": args.method,
        "search_backend": choose_backend(w0, args.method),
        "weights": len(result.weights),
        "passes_over_data": result.forward_calls / len(batches),
        "warmup_s": t_warm,
        "plain_forward_s": t_fwd,
        "plain_forward_no_logits_s": t_fwd_trim,
        "forward_capture_s": t_capture,
        "search_s": t_search,
        "search_kernels_s": kern["search kernels"],
        "search_all_gpu_s": kern["all GPU kernels"],
        "search_phase_over_kernels": t_search / kern["search kernels"] if kern["search kernels"] > 0 else None,
        "total_s": t_total,
        "total_capture_s": result.timings["capture"],
        "total_search_s": result.timings["search"],
        "loss_reduction_vs_max": 1 - loss_chosen / loss_max if loss_max > 0 else 0.0,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(numbers, indent=2) + "\n")
        tmp.replace(args.json)
    n = numbers
    print(f"\nfp4cal calibrate, {n['device']}, torch {n['torch']}, transformers {n['transformers']}")
    print(f"Qwen3-8B shapes, {n['layers']} layers ({n['weights']} weights), {n['samples']} x {n['seq']} tokens, "
          f"batch {n['batch']}, bf16, method {n['method']}, search backend {n['search_backend']}")
    print(f"warm-up (1 batch; CUDA start, kernel compilation): {t_warm:.2f} s")
    print("| phase | seconds |")
    print("|---|---|")
    print(f"| plain forward (full logits, ModelOpt's baseline) | {t_fwd:.2f} |")
    print(f"| plain forward (logits_to_keep=1, as calibration runs it) | {t_fwd_trim:.2f} |")
    print(f"| forward + capture (Hessians + activation amax) | {t_capture:.2f} |")
    print(f"| search ({n['weights']} weights) | {t_search:.2f} |")
    print(f"| total calibrate() | {t_total:.2f} |")
    ratio = t_search / max(kern["search kernels"], 1e-9)
    print(f"search phase vs its kernels (#13.3; floor <= 2x, goal <= 1.25x): phase {t_search * 1e3:.1f} ms, search "
          f"kernels {kern['search kernels'] * 1e3:.1f} ms (prep + sweep + factor), all GPU kernels of the phase "
          f"{kern['all GPU kernels'] * 1e3:.1f} ms: phase / search kernels = {ratio:.2f}x")
    print(f"passes over the data: {n['passes_over_data']:g}; loss reduction vs max: "
          f"{100 * n['loss_reduction_vs_max']:.1f} %; peak GPU memory {n['peak_gpu_mem_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
