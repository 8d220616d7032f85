"""The user's wall clock: a checkpoint on disk -> a written NVFP4 checkpoint, fp4cal vs Model Optimizer 0.47.

1. Writes a checkpoint with Qwen3-8B's shapes (hidden 4096, intermediate 12288, 32 heads, 8 kv heads, head_dim
   128, vocab 151936; --layers N, default 36) or, with --moe, Qwen3-30B-A3B's (hidden 2048, 128 experts of 768,
   8 routed, 32 heads, 4 kv heads; --layers default 8): random bf16 weights, sharded safetensors (5 GB shards),
   the tokenizer files of --assets (a BERT tokenizer: /work/main/.anchor/assets). --tiny: a 2-layer toy on the
   CPU, to test this script anywhere.
2. Runs, each in a fresh subprocess and timed from the outside (wall clock, as a user types it):
     fp4cal streaming   python -m fp4cal quantize CKPT --out OUT --streaming --gpu-memory-fraction F
     fp4cal whole       python -m fp4cal quantize CKPT --out OUT --no-streaming
     modelopt           from_pretrained(device_map="cuda") + mtq.quantize(local_hessian, layerwise) +
                        export_hf_checkpoint (a comparison only; needs modelopt importable)
   "cold" (a run name ending in -cold): TRITON_CACHE_DIR, TORCH_EXTENSIONS_DIR and FP4CAL_CACHE pointed at new
   empty folders; otherwise the folders of that tool (one for fp4cal's runs, one for ModelOpt's) as earlier
   runs left them, so list a tool's cold run first. Calibration data: --samples x --seq-len tokens of --assets/texts.
3. Prints one table: wall clock, the run's own phases, peak GPU / CPU memory, ratio to Model Optimizer (warm).

Usage: python bench/bench_e2e.py --assets DIR [--layers 4] [--moe] [--runs stream-cold,stream,whole,mo-cold,mo,mo-plain]
       [--work DIR] [--json PATH] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def config(args):
    from transformers import Qwen3Config, Qwen3MoeConfig

    if args.tiny:
        kw = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  vocab_size=30522, max_position_embeddings=max(64, args.seq_len))
        if args.moe:
            return Qwen3MoeConfig(**kw, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                  num_hidden_layers=args.layers or 2, dtype="bfloat16")
        return Qwen3Config(**kw, num_hidden_layers=args.layers or 2, dtype="bfloat16")
    if args.moe:
        return Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                              num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                              vocab_size=151936, num_hidden_layers=args.layers or 8, max_position_embeddings=40960,
                              dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"])
    return Qwen3Config(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, num_hidden_layers=args.layers or 36,
                       max_position_embeddings=40960, dtype="bfloat16", architectures=["Qwen3ForCausalLM"])


def write_checkpoint(args, ckpt: Path) -> dict:
    """Random bf16 checkpoint tensors under the names save_pretrained would use (per-expert for MoE), written
    shard by shard from the meta skeleton (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from fp4cal.export.exporter import checkpoint_entries, model_tensors

    cfg = config(args)
    if not args.tiny:
        cfg.architectures = cfg.architectures or [("Qwen3MoeForCausalLM" if args.moe else "Qwen3ForCausalLM")]
    else:
        cfg.architectures = ["Qwen3MoeForCausalLM" if args.moe else "Qwen3ForCausalLM"]
    ckpt.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(ckpt)
    for name in TOKENIZER_FILES:
        if (Path(args.assets) / name).is_file():
            shutil.copy(Path(args.assets) / name, ckpt / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator(device=args.gen_device).manual_seed(0)
    t0 = time.perf_counter()
    shard, size, files, weight_map, total = {}, 0, [], {}, 0
    limit = 5 * 10**9

    def flush():
        nonlocal shard, size
        if shard:
            name = f"part-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(ckpt / name), metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, size = {}, 0

    for e in checkpoint_entries(model, model_tensors(model), {}):
        for piece in e.pieces:
            shape = tuple(piece.shape)
            if len(shape) >= 2:
                t = torch.randn(shape, generator=gen, device=args.gen_device, dtype=torch.bfloat16) * 0.02
            else:
                t = torch.ones(shape, dtype=torch.bfloat16)
            t = t.cpu()
            n = t.numel() * 2
            if shard and size + n > limit:
                flush()
            shard[piece.name] = t
            size += n
            total += n
    flush()
    n = len(files)
    for i, (name, names) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.rename(ckpt / name, ckpt / final)
        weight_map.update(dict.fromkeys(names, final))
    with open(ckpt / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return {"bytes": total, "shards": n, "seconds": time.perf_counter() - t0}


MODELOPT_CHILD = r'''
import atexit, json, os, resource, sys, time
t_start = time.perf_counter()
def _age():
    stat = open("/proc/self/stat").read()
    start = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return float(open("/proc/uptime").read().split()[0]) - start
atexit.register(lambda: print(f"[mo trace] {{_age():8.3f}} s  interpreter exit begins (atexit)", flush=True))
import torch
sys.path.insert(0, {src!r})
from fp4cal.calib.data import calibration_batches
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer
import copy
ph = {{}}
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained({ckpt!r}, device_map="cuda", dtype=torch.bfloat16).eval()
tok = AutoTokenizer.from_pretrained({ckpt!r})
batches = calibration_batches(tok, {texts!r}, {samples}, {seq_len}, {batch})
torch.cuda.synchronize(); ph["load + data"] = time.perf_counter() - t; t = time.perf_counter()
cfg = copy.deepcopy(mtq.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG)
cfg["algorithm"] = {{"method": "local_hessian", "fp8_scale_sweep": True}}
if {layerwise}:
    cfg["algorithm"]["layerwise"] = {{"enable": True, "calib_mutates_weights": False}}
if {gptq}:  # its fused layerwise GPTQ (max block scales), as bench_gptq.py runs it
    cfg["algorithm"] = {{"method": "gptq", "fused": True, "layerwise": {{"enable": True}}}}
def loop(m):
    with torch.no_grad():
        for b in batches:
            m(input_ids=b["input_ids"].cuda())
mtq.quantize(model, cfg, loop)
torch.cuda.synchronize(); ph["calibrate"] = time.perf_counter() - t; t = time.perf_counter()
print(f"calibrated in {{ph['calibrate']:.2f}} s (load + data {{ph['load + data']:.2f}} s)", flush=True)
export_hf_checkpoint(model, export_dir={out!r})
torch.cuda.synchronize(); ph["export"] = time.perf_counter() - t
ph["total"] = time.perf_counter() - t_start
print("time: " + " | ".join(f"{{k}} {{v:.2f}} s" for k, v in ph.items()))
print(f"peak memory: GPU {{torch.cuda.max_memory_allocated() / 2**30:.1f}} GiB, CPU "
      f"{{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}} GiB (max resident set)")
'''


MODELOPT_BUILD = r'''
import copy, torch
import modelopt.torch.quantization as mtq
from transformers import AutoModelForCausalLM, Qwen3Config
cfg = Qwen3Config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  vocab_size=1024, num_hidden_layers=1)
model = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16).eval()
q = copy.deepcopy(mtq.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG)
q["algorithm"] = {{"method": "local_hessian", "fp8_scale_sweep": True}}
mtq.quantize(model, q, lambda m: m(input_ids=torch.randint(0, 1024, (2, 64), device="cuda")))
model = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16).eval()  # GPTQ's kernels compile too
q = copy.deepcopy(mtq.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG)
q["algorithm"] = {{"method": "gptq", "fused": True, "layerwise": {{"enable": True}}}}
mtq.quantize(model, q, lambda m: m(input_ids=torch.randint(0, 1024, (2, 64), device="cuda")))
print("time: build 0.00 s")
'''


def output_digest(out: Path) -> str:
    """sha256 over the written tensors (name, dtype, shape, bytes; sorted by name, whatever the sharding: the
    streaming path writes a shard per layer, the whole-model path by size): equal digests = equal tensors."""
    import hashlib

    import torch
    from safetensors import safe_open

    per = {}
    for p in sorted(out.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).contiguous()
                d = hashlib.sha256(f"{name} {t.dtype} {tuple(t.shape)}".encode())
                if t.numel():
                    d.update(t.view(-1).view(torch.uint8).numpy().tobytes())
                per[name] = d.hexdigest()
    return hashlib.sha256("".join(per[k] for k in sorted(per)).encode()).hexdigest()[:16]


def run_child(label: str, cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        out, code = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, code = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s", -1
    wall = time.perf_counter() - t0
    log.write_text(" ".join(cmd) + "\n\n" + (out if isinstance(out, str) else out.decode()))
    row = {"run": label, "wall": wall, "rc": code, "phases": {}, "gpu": None, "cpu": None, "path": None,
           "exit": None}
    for line in out.splitlines():
        m = re.match(r"\[(?:fp4cal|mo) trace\]\s+([\d.]+) s\s+(?:interpreter exit begins|exit)", line)
        if m:  # what the process spent after its last Python line: interpreter and CUDA teardown
            row["exit"] = wall - float(m.group(1))
        if line.startswith("time: "):
            for part in line[6:].split(" | "):
                m = re.match(r"(.+) ([\d.]+) s$", part.strip())
                if m:
                    row["phases"][m.group(1)] = float(m.group(2))
        if line.startswith("peak GPU memory by phase: "):
            row["gpu_by_phase"] = line.split(": ", 1)[1]
        m = re.match(r"peak memory: (?:GPU ([\d.]+) GiB, )?CPU ([\d.]+) GiB", line)
        if m:
            row["gpu"] = float(m.group(1)) if m.group(1) else None
            row["cpu"] = float(m.group(2))
        if line.startswith("path: "):
            row["path"] = line[6:]
    if code != 0:
        row["error"] = out.strip().splitlines()[-1][:300] if out.strip() else f"exit {code}"
    print(f"  {label}: {wall:.1f} s (rc {code})", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", required=True, help="folder with the tokenizer files and texts/ (Shakespeare)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 36; 8 with --moe; 2 --tiny)")
    ap.add_argument("--moe", action="store_true", help="Qwen3-30B-A3B shapes instead of Qwen3-8B")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy on the CPU (tests this script)")
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (default 128; 4 --tiny)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; 32 --tiny)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--method", default="local_hessian")
    ap.add_argument("--memory-fraction", type=float, default=None,
                    help="streaming's GPU cap, fraction of the card (default: 25 %% of the bf16 model's size, at "
                    "least 6 GiB: the embedding and one batch's temporaries must fit)")
    ap.add_argument("--runs", default="stream-cold,stream,whole,mo-cold,mo",
                    help="comma list of stream-cold, stream, whole-cold, whole, mo-cold, mo, mo-plain(-cold); "
                    "stream2: streaming with --nproc 2 (two GPUs); stream-gptq: --method gptq streamed (uncapped); "
                    "RUN@bN: that fp4cal run with --batch-size N; "
                    "mo-build: only ModelOpt's extension build on a tiny model (so that mo-plain is warm); "
                    "mo-gptq: ModelOpt's fused layerwise GPTQ (compare with stream-gptq); "
                    "build / build-gptq: only fp4cal's kernel compilation (a streamed run on 8 x 64 tokens, "
                    "local_hessian / gptq), so that the runs after it are warm; "
                    "whole-prof / stream-prof: a warm run under cProfile (WORK/logs/RUN.prof); whole-nowarm / "
                    "stream-nowarm: without the kernel warm-up thread")
    ap.add_argument("--work", default=None, help="folder for the checkpoint and outputs (default: a temp dir)")
    ap.add_argument("--caches", default=None, help="folder for the tools' cache folders (default: --work; share "
                    "it between two invocations to keep their compiled kernels)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--logs", default=None, help="folder for each run's output (default: WORK/logs)")
    args = ap.parse_args()
    args.samples = args.samples or (4 if args.tiny else 128)
    args.seq_len = args.seq_len or (32 if args.tiny else 2048)
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    args.gen_device = "cuda" if cuda else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="fp4cal-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    caches = Path(args.caches) if args.caches else work
    logs = Path(args.logs) if args.logs else work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    if not (ckpt / "model.safetensors.index.json").exists():
        info = write_checkpoint(args, ckpt)
        print(f"checkpoint: {info['bytes'] / 2**30:.2f} GiB in {info['shards']} shards, written in "
              f"{info['seconds']:.1f} s", flush=True)
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    # the checkpoint a user quantizes was written long before: flush the bench's own dirty pages now, or every
    # run's writes are throttled behind their writeback
    t0 = time.perf_counter()
    os.sync()
    print(f"sync after writing the checkpoint: {time.perf_counter() - t0:.2f} s", flush=True)
    t0 = time.perf_counter()
    for p in sorted(ckpt.glob("*.safetensors")):
        with open(p, "rb") as f:
            while f.read(1 << 26):
                pass
    read_s = time.perf_counter() - t0
    print(f"reading the checkpoint (page cache as it is): {read_s:.2f} s for {size / 2**30:.2f} GiB", flush=True)

    total_gpu = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    frac = args.memory_fraction or (min(1.0, max(0.25 * size, 6 * 2**30) / total_gpu) if cuda else None)
    texts = str(Path(args.assets) / "texts")
    base = [sys.executable, "-m", "fp4cal", "quantize", str(ckpt), "--calib", texts, "--samples", str(args.samples),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--method", args.method,
            "--no-progress", "--device", "cuda" if cuda else "cpu"]
    rows = []
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        base_run = run.partition("@b")[0]
        cold = base_run.endswith("-cold")
        profiled = base_run.endswith("-prof")  # fp4cal's main thread under cProfile (FP4CAL_PROFILE): slower
        nowarm = base_run.endswith("-nowarm")  # fp4cal without its kernel warm-up thread (FP4CAL_WARMUP=0)
        run_name, _, bopt = run.partition("@b")  # "stream@b4": that run with --batch-size 4
        kind = run_name.removesuffix("-cold").removesuffix("-prof").removesuffix("-nowarm")
        # ModelOpt: local_hessian with / without its layerwise mode, its extension build, its GPTQ
        mo = kind in ("mo", "mo-plain", "mo-build", "mo-gptq")
        cache = caches / ("cache-mo" if mo else "cache-fp4cal")  # warm: after that tool's cold run
        if cold and cache.exists():
            shutil.rmtree(cache)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               "TRITON_CACHE_DIR": str(cache / "triton"), "TORCH_EXTENSIONS_DIR": str(cache / "torch_ext"),
               "FP4CAL_CACHE": str(cache / "fp4cal"), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "FP4CAL_TRACE": "1"}  # fp4cal's steps with their process age, and the start of its exit
        if profiled:
            env["FP4CAL_PROFILE"] = str(logs / f"{run}.prof")
        if nowarm:
            env["FP4CAL_WARMUP"] = "0"
        out = work / f"out-{run}"
        if out.exists():
            shutil.rmtree(out)
        if kind in ("stream", "stream2"):
            cmd = base + ["--out", str(out), "--streaming"] + (["--nproc", "2"] if kind == "stream2" else [])
            if frac:
                cmd += ["--gpu-memory-fraction", f"{frac:.4f}"]
        elif kind == "stream-gptq":  # GPTQ with quantized propagation, one layer at a time, no memory cap
            cmd = [c if c != args.method else "gptq" for c in base] + ["--out", str(out), "--streaming"]
        elif kind in ("build", "build-gptq"):  # fp4cal's cold start: its Triton kernels for this checkpoint's
            # shapes compiled into the bench's cache by a streamed run on a few tokens (as mo-build does for ModelOpt)
            cmd = base + ["--out", str(out), "--streaming"]
            for flag, value in (("--samples", "8"), ("--seq-len", "64")):
                cmd[cmd.index(flag) + 1] = value
            if kind == "build-gptq":
                cmd[cmd.index("--method") + 1] = "gptq"
        elif kind == "whole":
            cmd = base + ["--out", str(out), "--no-streaming"]
        elif mo:
            if not cuda:
                print(f"  {run}: skipped (Model Optimizer needs CUDA)")
                continue
            if kind == "mo-build":  # only builds ModelOpt's CUDA extension (its cold start) on a tiny model
                code = MODELOPT_BUILD.format()
            else:
                code = MODELOPT_CHILD.format(src=str(ROOT / "src"), ckpt=str(ckpt), texts=texts, samples=args.samples,
                                             seq_len=args.seq_len, batch=args.batch_size, out=str(out),
                                             layerwise=kind == "mo", gptq=kind == "mo-gptq")
            cmd = [sys.executable, "-c", code]
        else:
            raise SystemExit(f"unknown run {run!r}")
        if bopt:
            if mo:
                raise SystemExit(f"{run}: @bN applies to fp4cal's runs")
            i = cmd.index("--batch-size")
            cmd[i + 1] = str(int(bopt))
        os.sync()  # the previous run's output is deleted; nothing of it is left to write back during this run
        rows.append(run_child(run, cmd, env, logs / f"{run}.log", args.timeout))
        rows[-1]["cold"] = cold
        if not mo and rows[-1]["rc"] == 0 and out.is_dir():  # same bytes across fp4cal's paths?
            rows[-1]["digest"] = output_digest(out)
        shutil.rmtree(out, ignore_errors=True)

    # the ratio is against ModelOpt's fastest warm run (layerwise or not), the fairest anchor for a user
    ref = min((r["wall"] for r in rows if r["run"] in ("mo", "mo-plain") and r["rc"] == 0), default=None)
    rows_shown = [r for r in rows if r["run"] not in ("mo-build", "build", "build-gptq")]
    shape = "tiny" if args.tiny else ("Qwen3-30B-A3B" if args.moe else "Qwen3-8B")
    print(f"\n{shape}-shaped, {config(args).num_hidden_layers} layers, "
          f"{size / 2**30:.2f} GiB bf16; {args.samples} x {args.seq_len} tokens, {args.method}; "
          f"checkpoint read {read_s:.2f} s; streaming GPU cap {frac if frac else '-'}")
    print(f"{'run':<12} {'wall s':>8} {'vs MO':>6} {'exit s':>6} {'GPU GiB':>8} {'CPU GiB':>8}  phases (s)")
    for r in rows_shown:
        ratio = f"{ref / r['wall']:.2f}x" if ref and r["rc"] == 0 else "-"
        gpu = f"{r['gpu']:.1f}" if r["gpu"] is not None else "-"
        cpu = f"{r['cpu']:.1f}" if r["cpu"] is not None else "-"
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items()) or r.get("error", "")
        ext = f"{r['exit']:.1f}" if r.get("exit") is not None else "-"
        print(f"{r['run']:<12} {r['wall']:>8.1f} {ratio:>6} {ext:>6} {gpu:>8} {cpu:>8}  {phases}")
        if r.get("gpu_by_phase"):
            print(f"{'':<12} peak GPU by phase: {r['gpu_by_phase']}")
    walls = {r["run"]: r["wall"] for r in rows_shown if r["rc"] == 0}
    if "stream-gptq" in walls and "mo-gptq" in walls:  # GPTQ against GPTQ, not against the vs-MO column's anchor
        print(f"GPTQ: fp4cal stream-gptq {walls['stream-gptq']:.1f} s, ModelOpt fused layerwise GPTQ "
              f"{walls['mo-gptq']:.1f} s: {walls['mo-gptq'] / walls['stream-gptq']:.2f}x")
    digests = {}
    for r in rows_shown:
        if r.get("digest"):
            digests.setdefault((r["digest"]), []).append(r["run"])
    if digests:
        print("written checkpoints, same bytes: " + "; ".join(" = ".join(v) + f" ({k})" for k, v in digests.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checkpoint_bytes": size, "read_s": read_s,
                                               "fraction": frac, "args": vars(args)}, indent=2, default=str))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
