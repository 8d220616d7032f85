"""Distributed calibration on N GPUs against one: equal per-block amax, and the time of each phase.

Set-up as bench/bench_calibrate.py: a randomly initialized Qwen3 model with Qwen3-8B's layer shapes (hidden
4096, intermediate 12288, 32 heads, 8 kv heads, head_dim 128, vocab 151936) and 4 decoder layers, bf16,
128 samples x 2048 random token ids, batch 8, method local_hessian. The script spawns N processes itself
(torch.multiprocessing, NCCL, one GPU each); rank 0's model is broadcast to the others so every rank holds
the same weights. Then:

    warm-up           calibrate() on one batch on every rank, and calibrate_distributed() on N batches
                      (CUDA / cuBLAS start, Triton kernel compilation), not timed in the table
    1 GPU             calibrate() on rank 0 alone, all batches (the others wait at a barrier)
    N GPUs            calibrate_distributed() on all ranks, all batches

and checks that every rank's result has exactly (torch.equal) the block amax, the FP8 codes and the losses of
the 1-GPU result. Times: capture = this rank's forwards + capture; all-reduce = the statistics reduction (it
also absorbs the wait for the slowest rank's capture); search = until every rank finished its share;
gather = broadcast of the results. Rank 0's numbers are reported (the phases end at collectives, so
they are within a few ms of the slowest rank's).

    python bench/bench_distributed.py [--nproc N] [--json PATH] [--layers 4] [--samples 128] [--seq 2048]
    python bench/bench_distributed.py --device cpu --tiny --nproc 2     # plumbing check without GPUs (gloo)

Exit status 1 when any per-block amax differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from fp4cal.calib.calibrate import calibrate  # noqa: E402
from fp4cal.calib.distributed import assign_owners, calibrate_distributed, search_cost  # noqa: E402
from fp4cal.calib.targets import find_targets  # noqa: E402
from fp4cal.search import choose_backend  # noqa: E402
from timing import timed  # noqa: E402 - bench/timing.py, beside this script


def build_model(layers: int, seq: int, tiny: bool, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen3Config

    if tiny:  # same architecture, toy sizes: for checking the script's plumbing on a CPU
        cfg = Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=seq)
    else:
        cfg = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=seq)
    torch.manual_seed(0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device(device):  # initialize in place: seconds instead of a minute for the full shapes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), cfg


def barrier(device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def digest(result) -> str:
    """sha256 over every weight's name, block amax and FP8 codes, in result order."""
    h = hashlib.sha256()
    for name, wr in result.weights.items():
        h.update(name.encode())
        h.update(wr.block_amax.detach().contiguous().cpu().numpy().tobytes())
        h.update(wr.block_scale.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def compare(got, want) -> list[str]:
    """Names of weights whose block amax, codes or losses differ (empty: bit-for-bit equal)."""
    bad = []
    if list(got.weights) != list(want.weights):
        return ["<the weight lists differ>"]
    for name, w in want.weights.items():
        g = got.weights[name]
        same = torch.equal(g.block_amax, w.block_amax) and torch.equal(
            g.block_scale.view(torch.uint8), w.block_scale.view(torch.uint8)
        ) and (g.loss_max, g.loss_chosen) == (w.loss_max, w.loss_chosen)
        if not same:
            bad.append(name)
    return bad


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_json: str) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        model, cfg = build_model(args.layers, args.seq, args.tiny, device)
        with torch.no_grad():  # every rank gets rank 0's weights, whatever the per-device RNG does
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (args.samples, args.seq), generator=g)
        batches = list(ids.split(args.batch))  # on the CPU; each forward moves its batch to the GPU
        method = args.method

        # warm-up: kernels compiled, cuBLAS handles created, on every rank and in both code paths
        _, t_warm_single = timed(lambda: calibrate(model, batches[:1], method), device)
        _, t_warm_dist = timed(lambda: calibrate_distributed(model, batches[: max(world, 1)], method), device)

        # 1 GPU: rank 0 alone
        single = None
        if rank == 0:
            single, t_single = timed(lambda: calibrate(model, batches, method), device)
        barrier(device)

        # N GPUs
        barrier(device)
        result, t_dist = timed(lambda: calibrate_distributed(model, batches, method), device)
        barrier(device)

        digests = [None] * world
        dist.all_gather_object(digests, digest(result))
        timings = [None] * world
        dist.all_gather_object(timings, dict(result.timings))
        barrier(device)  # leave together (a gloo peer exiting early can abort the other at exit)
        if rank != 0:
            return
        targets, _ = find_targets(model)
        owners = assign_owners(targets, method, world)
        load = [sum(search_cost(t, method) for t, o in zip(targets, owners, strict=True) if o == r)
                for r in range(world)]
        ref = digest(single)
        mismatched = compare(result, single)
        ts, td = single.timings, result.timings
        n = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "nproc": world,
            "backend": dist.get_backend(),
            "layers": args.layers, "samples": args.samples, "seq": args.seq, "batch": args.batch,
            "tiny": args.tiny, "method": method,
            "search_backend": choose_backend(targets[0].weight(), method),
            "weights": len(result.weights),
            "equal_block_amax_vs_1gpu": not mismatched,
            "mismatched_weights": mismatched[:20],
            "all_ranks_identical": all(d == ref for d in digests),
            "search_load_share": [x / sum(load) for x in load],
            "warmup_single_s": t_warm_single, "warmup_dist_s": t_warm_dist,
            "single": {"capture_s": ts["capture"], "search_s": ts["search"], "total_s": t_single},
            "dist": {"capture_s": td["capture"], "reduce_s": td["reduce"], "search_s": td["search"],
                     "gather_s": td["gather"], "total_s": t_dist},
            "dist_per_rank": timings,
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        Path(out_json).write_text(json.dumps(n, indent=2) + "\n")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=None, help="processes / GPUs (default: every visible GPU)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=None, help="default 128 (16 with --tiny)")
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (64 with --tiny)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--method", default="local_hessian", choices=("local_hessian", "mse", "max"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="toy layer sizes (plumbing check)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    args.samples = args.samples or (16 if args.tiny else 128)
    args.seq = args.seq or (64 if args.tiny else 2048)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("bench_distributed.py needs CUDA GPUs (or --device cpu --tiny for a plumbing check)", file=sys.stderr)
            return 2
        visible = torch.cuda.device_count()
        args.nproc = args.nproc or visible
        if args.nproc > visible:
            print(f"--nproc {args.nproc} but only {visible} GPUs are visible", file=sys.stderr)
            return 2
    else:
        args.nproc = args.nproc or 2
    if args.nproc < 2:
        print("note: one process: the N-GPU run is a 1-process distributed run", file=sys.stderr)
    out_json = Path(args.json) if args.json else Path(f"/tmp/bench_distributed.{os.getpid()}.json")
    tmp = out_json.with_suffix(".tmp")
    torch.multiprocessing.spawn(worker, args=(args.nproc, free_port(), args, str(tmp)), nprocs=args.nproc, join=True)
    n = json.loads(tmp.read_text())
    if args.json:
        tmp.replace(out_json)
    else:
        tmp.unlink()
    s, d, w = n["single"], n["dist"], n["nproc"]
    shape = "toy Qwen3 shapes" if n["tiny"] else "Qwen3-8B shapes"
    print(f"\nfp4cal distributed calibration, {w} x {n['device']} ({n['backend']}), torch {n['torch']}")
    print(f"{shape}, {n['layers']} layers ({n['weights']} weights), {n['samples']} x {n['seq']} tokens, batch "
          f"{n['batch']}, method {n['method']}, search backend {n['search_backend']}")
    print(f"search load per rank (cost share): {', '.join(f'{x:.2f}' for x in n['search_load_share'])}")
    print(f"per-block amax equal to 1 process (torch.equal, every weight): {n['equal_block_amax_vs_1gpu']}; "
          f"all ranks identical: {n['all_ranks_identical']}")
    if n["mismatched_weights"]:
        print("  differing: " + ", ".join(n["mismatched_weights"]))

    def x(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "-"

    dist_search = d["search_s"] + d["gather_s"]
    dist_capture = d["capture_s"] + d["reduce_s"]
    print(f"| phase | 1 process (s) | {w} processes (s) | speed-up |")
    print("|---|---|---|---|")
    print(f"| forward + capture (+ all-reduce) | {s['capture_s']:.2f} | {dist_capture:.2f} "
          f"({d['capture_s']:.2f} + {d['reduce_s']:.2f}) | {x(s['capture_s'], dist_capture)} |")
    print(f"| scale search (+ gather) | {s['search_s']:.2f} | {dist_search:.2f} ({d['search_s']:.2f} + "
          f"{d['gather_s']:.2f}) | {x(s['search_s'], dist_search)} |")
    print(f"| total | {s['total_s']:.2f} | {d['total_s']:.2f} | {x(s['total_s'], d['total_s'])} |")
    ok = n["equal_block_amax_vs_1gpu"] and n["all_ranks_identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
