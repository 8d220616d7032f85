"""fp4cal quantize: calibrate a Hugging Face model (default: the bundled all-MiniLM-L6-v2) and optionally export it.

    fp4cal quantize [MODEL_DIR] --method local_hessian --calib FILE --samples 32 --seq-len 128 \
        --out OUT_DIR --format compressed-tensors --device auto [--nproc N]

Checkpoint directories that would not fit on the device are streamed one decoder layer at a time
(fp4cal.stream: bounded memory, resumable, export overlapped with calibration); --streaming / --no-streaming
force the choice and the summary says which path ran and why.

With --nproc N (or when started by torchrun: ``torchrun --standalone --nproc-per-node N -m fp4cal quantize ...``)
calibration runs in N processes through torch.distributed (fp4cal.calib.distributed): one GPU each with NCCL,
gloo on the CPU; rank 0 prints the summary and writes the checkpoint.

Prints a summary table: weights per layer type, fallbacks, skipped weights, time per phase, and the loss
reduction of the chosen scales against max scales under the searched objective.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

from fp4cal.cli.clock import process_age, trace, tracing
from fp4cal.cli.common import CliError, check_min, check_output_dir, parse_device
from fp4cal.cli.model import DTYPES, check_model_dir, load_model_for_run, resolve_model_dir
from fp4cal.export import FORMATS as EXPORT_FORMATS
from fp4cal.gptq import DEFAULT_SCALES as GPTQ_DEFAULT_SCALES
from fp4cal.gptq import SCALES as GPTQ_SCALES
from fp4cal.gptq import check_damp
from fp4cal.search import METHODS

FORMATS = tuple(sorted(EXPORT_FORMATS))  # the export package's plug-ins: one list of formats


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None, help="Hugging Face model directory (default: bundled MiniLM)")
    p.add_argument("--method", choices=METHODS + ("gptq",), default="local_hessian",
                   help="scale search, or gptq: GPTQ rounding on top of --gptq-scales (default: %(default)s)")
    p.add_argument("--gptq-scales", choices=GPTQ_SCALES, default=GPTQ_DEFAULT_SCALES,
                   help="--method gptq: how block scales are chosen (default: %(default)s)")
    p.add_argument("--gptq-damp", type=float, default=0.01,
                   help="--method gptq: relative damping lambda of H + lambda mean(diag H) I (default: %(default)s)")
    p.add_argument("--calib", default=None, help="calibration text file or directory (default: bundled Shakespeare)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the quantized checkpoint to this directory")
    p.add_argument("--format", choices=FORMATS, default="compressed-tensors", help="checkpoint format")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (default: the checkpoint's)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="also leave modules matching REGEX in high precision (repeatable; lm_head and routers "
                   "are always excluded)")
    p.add_argument("--include", action="append", default=None, metavar="REGEX",
                   help="only consider modules matching REGEX (repeatable)")
    p.add_argument("--min-expert-tokens", type=int, default=None,
                   help="MoE experts with fewer routed tokens fall back to mse (default: 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--streaming", dest="streaming", action="store_const", const=True, default=None,
                   help="stream the checkpoint one decoder layer at a time (default: when the model would not fit "
                   "on the device)")
    g.add_argument("--no-streaming", dest="streaming", action="store_const", const=False,
                   help="load the whole model on the device")
    p.add_argument("--propagation", choices=("float", "quantized"), default=None,
                   help="streaming: each layer sees the float outputs of the layers before it (equal to the "
                   "whole-model result) or those of the already fake-quantized layers (default: quantized for "
                   "--method gptq, float otherwise)")
    p.add_argument("--activation-budget", default=None, metavar="SIZE",
                   help="streaming: device memory the captured activations may take, e.g. 8GB; above it they live "
                   "in pinned CPU memory (default: a quarter of the free device memory)")
    p.add_argument("--restart", action="store_true",
                   help="streaming: discard an interrupted run of this --out instead of resuming it")
    p.add_argument("--gpu-memory-fraction", type=float, default=None, metavar="F",
                   help="cap this process's GPU memory to F of the device (torch.cuda.set_per_process_memory_"
                   "fraction); the streaming choice respects it")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="calibrate in N processes with torch.distributed (one GPU each; gloo on the CPU): batches "
                   "are split across processes, Hessians all-reduced, weights searched in parallel; re-launches "
                   "itself under torch.distributed.run (default: %(default)s)")


def _fail(msg: str, code: int = 2) -> int:
    print(f"fp4cal quantize: error: {msg}", file=sys.stderr)
    return code


def _load_exporter():
    """fp4cal.export.export, or an error string when it cannot be imported."""
    try:
        mod = importlib.import_module("fp4cal.export")
        return mod.export
    except (ImportError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"


def under_launcher() -> bool:
    """True when this process was started by torchrun / torch.distributed.run (its rank variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def command_line(args: argparse.Namespace) -> list[str]:
    """quantize's arguments that reproduce ``args`` (options left at their default are omitted)."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    positional: list[str] = []
    options: list[str] = []
    for a in p._actions:
        value = getattr(args, a.dest, a.default)
        if not a.option_strings:
            if value is not None:
                positional.append(str(value))
            continue
        if value == a.default:
            continue
        opt = next(o for o in a.option_strings if o.startswith("--"))
        if isinstance(a, argparse._StoreTrueAction):
            options.append(opt)
        elif isinstance(a, argparse._StoreConstAction):  # --streaming / --no-streaming share one dest
            if value == a.const:
                options.append(opt)
        elif isinstance(a, argparse._AppendAction):
            for item in value:
                options += [opt, str(item)]
        else:
            options += [opt, str(value)]
    return positional + options


def _relaunch(args: argparse.Namespace) -> int:
    """Run this same command in args.nproc processes under torch.distributed.run; its exit status."""
    import torch

    import fp4cal

    dev = parse_device(args.device)
    if dev.type == "cuda":
        if dev.index is not None:
            return _fail(f"--device {args.device} names one GPU, but with --nproc each process takes the GPU of its "
                         "local rank: pass --device cuda (or auto)")
        if torch.cuda.device_count() < args.nproc:
            return _fail(f"--nproc {args.nproc} needs {args.nproc} GPUs, but {torch.cuda.device_count()} are visible")
    env = dict(os.environ)
    src = str(Path(fp4cal.__file__).resolve().parents[1])  # the children import this same fp4cal
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    # without --nproc: the children read their number from WORLD_SIZE, and torch.distributed.run's own parser
    # would take "--nproc" for an abbreviation of its --nproc-per-node even after the script name
    child = argparse.Namespace(**{**vars(args), "nproc": 1})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "fp4cal", "quantize", *command_line(child)]
    print(f"fp4cal quantize: launching {args.nproc} processes: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    return subprocess.run(cmd, env=env).returncode


def _init_distributed(args: argparse.Namespace):
    """Under a launcher: this rank's device (cuda:LOCAL_RANK or cpu) and an initialized process group
    (nccl on CUDA, gloo on the CPU). Returns (rank, world, device)."""
    import torch
    import torch.distributed as dist

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if args.nproc > 1 and args.nproc != world:
        raise ValueError(f"--nproc {args.nproc} but the launcher started WORLD_SIZE = {world} processes")
    dev = parse_device(args.device)
    if dev.type == "cuda":
        if dev.index is not None and world > 1:
            raise ValueError(f"--device {args.device} names one GPU, but each of the {world} processes takes the GPU "
                             "of its local rank: pass --device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU: {torch.cuda.device_count()} are visible")
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


_MEMORY_FRACTION: dict[str, float] = {}  # what --gpu-memory-fraction set, per device (torch cannot be asked)


def checkpoint_bytes(model_dir: Path) -> int:
    """Bytes of the safetensors files of a checkpoint directory (0 when it has none)."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def _available_memory(device) -> int:
    """Free memory where the whole model would go: the GPU (respecting a per-process fraction), or the host."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cap = total * _MEMORY_FRACTION.get(str(device), 1.0)
        return int(min(free, cap - torch.cuda.memory_reserved(device)))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def choose_path(args: argparse.Namespace, model_dir: Path, device) -> tuple[bool, str]:
    """(stream?, why): forced by --streaming / --no-streaming, else streaming when the checkpoint would take
    more than 70 % of the memory available on the device (the rest is for activations and statistics)."""
    if args.streaming is not None:
        return args.streaming, "--streaming" if args.streaming else "--no-streaming"
    size = checkpoint_bytes(model_dir)
    if size == 0:
        return False, "no safetensors files to stream from"
    avail = _available_memory(device)
    if size > 0.7 * avail:
        return True, f"the checkpoint ({_gib(size)}) would not fit in 70 % of the {_gib(avail)} free on {device}"
    return False, f"the checkpoint ({_gib(size)}) fits on {device} ({_gib(avail)} free)"


def _layer_type(module_name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", module_name)


def calibration_summary(result, header: str, phases: dict[str, float]) -> str:
    """The end-of-run table: per layer type (layers with their number replaced by *), weights, parameters,
    summed loss with max scales and with the chosen ones, and the reduction."""
    objective = {"local_hessian": "Hessian-weighted", "gptq": "layer-output tr(dW H dW^T)"}.get(result.method,
                                                                                               "squared-error")
    rows: dict[str, list] = {}
    for wr in result.weights.values():
        r = rows.setdefault(_layer_type(wr.name), [0, 0, 0.0, 0.0])
        r[0] += 1
        n = 1
        for s in wr.shape:
            n *= s
        r[1] += n
        r[2] += wr.loss_max
        r[3] += wr.loss_chosen
    width = max([len("layer type")] + [len(k) for k in rows])
    what = "of GPTQ vs round-to-nearest with max scales" if result.method == "gptq" else \
        "of the chosen scales vs max scales (summed over blocks)"
    lines = [header, "", f"{objective} loss {what}:"]
    lines.append(f"  {'layer type':<{width}}  {'n':>3}  {'params':>10}  {'loss(max)':>11}  {'loss(chosen)':>12}  "
                 f"{'reduction':>9}")

    def red(m: float, c: float) -> str:
        return f"{100 * (1 - c / m):8.2f}%" if m > 0 else f"{'-':>9}"

    tot = [0, 0, 0.0, 0.0]
    for k, (n, p, m, c) in rows.items():
        lines.append(f"  {k:<{width}}  {n:>3}  {p:>10,}  {m:>11.4e}  {c:>12.4e}  {red(m, c)}")
        tot = [tot[0] + n, tot[1] + p, tot[2] + m, tot[3] + c]
    lines.append(f"  {'total':<{width}}  {tot[0]:>3}  {tot[1]:>10,}  {tot[2]:>11.4e}  {tot[3]:>12.4e}  "
                 f"{red(tot[2], tot[3])}")
    fallbacks = [f"{n}: {wr.fallback}" for n, wr in result.weights.items() if wr.fallback]
    fallbacks += [f"{n}: {len(wr.expert_fallback)} expert(s) fell back to mse"
                  for n, wr in result.weights.items() if wr.expert_fallback]
    lines.append("")
    lines.append(f"weights quantized: {len(result.weights)}; fallbacks: {len(fallbacks)}; "
                 f"left in high precision: {len(result.skipped)}; model forwards: {result.forward_calls}")
    lines += [f"  fallback  {f}" for f in fallbacks]
    lines += [f"  skipped   {n}: {why}" for n, why in result.skipped.items()]
    lines.append("time: " + " | ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    trace("quantize: arguments parsed")
    if args.gpu_memory_fraction is not None and not 0 < args.gpu_memory_fraction <= 1:
        return _fail(f"--gpu-memory-fraction must be in (0, 1], got {args.gpu_memory_fraction}")
    try:  # every argument and output path is checked before minutes of loading and calibration
        check_min(args, ("samples", "seq_len", "batch_size", "nproc", "min_expert_tokens"))
        parse_device(args.device)
        if args.out is not None:
            check_output_dir(args.out, "--out", getattr(args, "overwrite", None))
        if args.method == "gptq":
            check_damp(args.gptq_damp, "--gptq-damp")
    except (CliError, ValueError) as e:
        return _fail(str(e))
    if args.method == "gptq" and (args.nproc > 1 or under_launcher()):
        return _fail("--method gptq runs in one process (its full Hessians are not all-reduced yet); drop --nproc")
    exporter = None
    if args.out is not None:
        exporter = _load_exporter()
        if isinstance(exporter, str):  # fail before spending minutes on calibration
            return _fail(f"export is unavailable (fp4cal.export could not be imported: {exporter})", 3)
    distributed = under_launcher()
    if args.nproc > 1 and not distributed:
        try:
            return _relaunch(args)
        except ValueError as e:
            return _fail(str(e))
    if not distributed:
        device = parse_device(args.device)  # checked above: raises nothing now
        if args.gpu_memory_fraction is not None and device.type == "cuda":
            import torch

            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_per_process_memory_fraction(args.gpu_memory_fraction, device)
            _MEMORY_FRACTION[str(device)] = args.gpu_memory_fraction
        model_path, label = resolve_model_dir(args.model_dir)
        try:
            check_model_dir(model_path)
        except FileNotFoundError as e:
            return _fail(str(e))
        stream, why = choose_path(args, model_path, device)
        args.warmup = start_kernel_warmup(args, model_path, device)  # compiles while the model loads
        trace("kernel warm-up started" if args.warmup is not None else "no kernel warm-up")
        if stream:
            return _run_streaming(args, model_path, label, device, why)
        args.path_reason = why
        return _run(args, exporter, None)
    import torch.distributed as dist

    try:
        ctx = _init_distributed(args)
    except ValueError as e:
        return _fail(str(e))
    try:
        if args.streaming:  # forced only: with several processes the automatic choice is the whole model
            model_path, label = resolve_model_dir(args.model_dir)
            code = _run_streaming(args, model_path, label, ctx[2], "--streaming", ctx)
        else:
            code = _run(args, exporter, ctx)
        # leave together (every rank gets here: failures before and during calibration are agreed on): a gloo
        # rank whose peer exits while their connection is still open can abort at exit
        if ctx[2].type == "cuda":
            dist.barrier(device_ids=[ctx[2].index])
        else:
            dist.barrier()
        return code
    finally:
        dist.destroy_process_group()


def start_kernel_warmup(args: argparse.Namespace, model_path: Path, device):
    """On CUDA, start compiling the search kernels this run needs (fp4cal.search.warmup, a background thread)
    for the checkpoint's dtype, so that a cold Triton cache costs load time rather than search time; None
    elsewhere (the CPU search compiles nothing) and with FP4CAL_WARMUP=0 (kernels compile at first use)."""
    import json

    import torch

    if device.type != "cuda" or os.environ.get("FP4CAL_WARMUP", "1") == "0":  # 0: compile at first use instead
        return None
    if args.method == "gptq":
        methods = ["mse"] if args.gptq_scales in ("mse", "max") else ["local_hessian"]
    else:
        methods = [m for m in (args.method,) if m != "max"]
    if not methods:
        return None
    try:
        cfg = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    dtype = args.dtype
    if dtype == "auto":
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(dtype), torch.bfloat16)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.bfloat16
    from fp4cal.search import warmup

    # the weights' shape classes from the config (hidden and MLP widths as rows and as inputs; expert stacks)
    widths = [int(cfg.get(k)) for k in ("hidden_size", "intermediate_size", "moe_intermediate_size")
              if isinstance(cfg.get(k), int) and cfg.get(k) > 0]
    stacked = any(isinstance(cfg.get(k), int) and cfg.get(k) > 1 for k in ("num_experts", "num_local_experts",
                                                                            "n_routed_experts"))
    shapes = [(r, c, s) for r in widths for c in widths for s in ((False, True) if stacked else (False,))] or None
    return warmup(methods, dtype, device, shapes=shapes, calibration_only=True)



def wait_for_warmup(args: argparse.Namespace) -> tuple[float, float | None]:
    """(seconds this thread waited, seconds the warm-up took in all, None without one). A failed warm-up is
    reported and ignored: the search then compiles what it needs itself."""
    handle = getattr(args, "warmup", None)
    if handle is None:
        return 0.0, None
    t = time.perf_counter()
    try:
        took = handle.wait()
    except Exception as e:  # noqa: BLE001 - the run goes on; the kernels compile at first use instead
        print(f"fp4cal quantize: note: kernel warm-up failed ({type(e).__name__}: {e}); compiling at first use",
              file=sys.stderr)
        took = None
    return time.perf_counter() - t, took


def _wait_phase(args: argparse.Namespace, waited: float) -> dict[str, float]:
    """The summary's "kernel compile wait" phase, present when a warm-up ran (CUDA)."""
    return {"kernel compile wait": waited} if getattr(args, "warmup", None) is not None else {}


def _run(args: argparse.Namespace, exporter, ctx: tuple | None) -> int:
    """One process's work: ctx is None (single process) or (rank, world, device) under a launcher."""
    from fp4cal.calib.calibrate import DEFAULT_MIN_EXPERT_TOKENS, calibrate
    from fp4cal.calib.targets import DEFAULT_EXCLUDE
    from fp4cal.stream.data import cached_calibration_batches

    rank, world = (0, 1) if ctx is None else ctx[:2]
    if args.no_progress or rank != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    startup = process_age()  # interpreter, imports, argument checks: the user waited for them too
    err = None
    t_model = 0.0
    try:
        device = parse_device(args.device) if ctx is None else ctx[2]
        model, _, desc = load_model_for_run(args, device, tokenizer=False)
        t_model = time.perf_counter() - t0
        trace("model loaded")
    except (FileNotFoundError, ValueError, OSError, ImportError) as e:
        err = str(e)
    if err is None:
        try:  # token ids through the content-hash cache: a repeated run does not tokenize again
            batches = cached_calibration_batches(resolve_model_dir(args.model_dir)[0], args.calib, args.samples,
                                                 args.seq_len, args.batch_size)
            trace("calibration tokens ready")
        except (FileNotFoundError, ValueError, TypeError, OSError) as e:
            err = str(e)
    if ctx is not None:  # every rank stops if one cannot go on (the others would wait in a collective)
        from fp4cal.calib.distributed import first_error

        err = first_error(err)
    if err is not None:
        return _fail(err) if rank == 0 or ctx is None else 2
    t_load = time.perf_counter() - t0
    loading = {"startup": startup, "load model": t_model, "data": t_load - t_model}

    kwargs = dict(
        exclude=list(DEFAULT_EXCLUDE) + list(args.exclude),
        include=args.include,
        min_expert_tokens=DEFAULT_MIN_EXPERT_TOKENS if args.min_expert_tokens is None else args.min_expert_tokens,
        progress=not args.no_progress,
    )
    if args.method == "gptq":
        kwargs.update(gptq_scales=args.gptq_scales, gptq_damp=args.gptq_damp)
    if ctx is None:
        waited, args.warmup_seconds = wait_for_warmup(args)
        trace("kernel warm-up waited for")
        result = calibrate(model, batches, args.method, **kwargs)
        trace("calibrated")
        phases = {**loading, **_wait_phase(args, waited),
                  "calibration forward": result.timings["capture"], "scale search": result.timings["search"]}
    else:
        from fp4cal.calib.distributed import calibrate_distributed

        result = calibrate_distributed(model, batches, args.method, **kwargs)
        phases = {**loading, "calibration forward": result.timings["capture"],
                  "all-reduce": result.timings["reduce"], "scale search": result.timings["search"],
                  "gather": result.timings["gather"]}
    if exporter is not None:
        t1 = time.perf_counter()
        if ctx is None:
            exporter(result, model, args.out, format=args.format)
        else:  # one writer; the other ranks wait, and learn of its failure
            from fp4cal.calib.distributed import run_on_rank0

            run_on_rank0(lambda: exporter(result, model, args.out, format=args.format))
        phases["export"] = time.perf_counter() - t1
        trace("exported")
    total = startup + time.perf_counter() - t0
    phases["other"] = max(total - sum(phases.values()), 0.0)  # finding targets, global amax, the result's losses
    phases["total"] = total
    if rank != 0:
        return 0
    dtype = next(model.parameters()).dtype
    method = f"gptq ({args.gptq_scales} scales, damp {args.gptq_damp:g})" if args.method == "gptq" else args.method
    header = (f"fp4cal quantize: {desc}, method {method}, {args.samples} x {args.seq_len} tokens "
              f"({len(batches)} batches), {device}, {str(dtype).replace('torch.', '')}")
    if ctx is not None:
        header += f", {world} processes (timings of rank 0)"
    if args.out is not None:
        header += f"\nwrote {args.format} checkpoint to {args.out}"
    if getattr(args, "warmup_seconds", None) is not None:
        header += f"\nkernel compilation: {args.warmup_seconds:.2f} s in a background thread, started before loading"
    if getattr(args, "path_reason", None):
        header += f"\npath: whole model ({args.path_reason})"
    print(calibration_summary(result, header, phases) + "\n" + _memory_line(device))
    return 0


def _memory_line(device, peak_gpu: int | None = None, anon: int | None = None) -> str:
    """anon: the streamed run's anonymous CPU memory at its largest phase boundary (the resident set also counts
    the checkpoint's mapped file pages, which the kernel reclaims as needed)."""
    import torch

    if peak_gpu is None and device.type == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated(device)
    from fp4cal.stream.engine import peak_cpu_bytes

    gpu = f"GPU {_gib(peak_gpu)}, " if peak_gpu is not None else ""
    own = (f"; {_gib(anon)} anonymous at the largest phase boundary, the rest file pages: the mapped checkpoint "
           "and libraries" if anon else "")
    return f"peak memory: {gpu}CPU {_gib(peak_cpu_bytes())} (max resident set{own})"


def _allocator_trace(device) -> None:
    """FP4CAL_TRACE: the caching allocator's counters (a memory cap makes it free and retry: each cudaFree
    synchronizes the device, which shows in the forward's time)."""
    if not tracing() or device.type != "cuda":
        return
    import torch

    s = torch.cuda.memory_stats(device)
    trace(f"allocator: reserved peak {_gib(s.get('reserved_bytes.all.peak', 0))}, allocated peak "
          f"{_gib(s.get('allocated_bytes.all.peak', 0))}, alloc retries {s.get('num_alloc_retries', 0)}, "
          f"OOMs {s.get('num_ooms', 0)}, cudaMalloc {s.get('num_device_alloc', 0)}, cudaFree "
          f"{s.get('num_device_free', 0)}, cache flushes {s.get('num_sync_all_streams', 0)}")


def _run_streaming(args: argparse.Namespace, model_path: Path, label: str | None, device, why: str,
                   ctx: tuple | None = None) -> int:
    """The streaming path: fp4cal.stream.quantize_checkpoint, then the same summary plus memory. ctx: (rank,
    world, device) under a launcher: every rank streams its share of the batches, rank 0 writes and prints."""
    import torch

    from fp4cal.calib.calibrate import DEFAULT_MIN_EXPERT_TOKENS
    from fp4cal.calib.targets import DEFAULT_EXCLUDE
    from fp4cal.stream import quantize_checkpoint

    rank, world = (0, 1) if ctx is None else ctx[:2]
    if args.no_progress or rank != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    budget = args.activation_budget
    if budget is None and device.type == "cuda":  # asked after the engine's setup (the CUDA context is made
        def budget():  # meanwhile by the warm-up thread)
            return _available_memory(device) // 4
    startup = process_age()  # interpreter, imports, argument checks
    waited, args.warmup_seconds = wait_for_warmup(args)
    trace("kernel warm-up waited for")
    try:
        rep = quantize_checkpoint(
            model_path, args.out, None, texts=args.calib, samples=args.samples, seq_len=args.seq_len,
            batch_size=args.batch_size, method=args.method, format=args.format, propagation=args.propagation,
            device=device, dtype=dtype, exclude=list(DEFAULT_EXCLUDE) + list(args.exclude), include=args.include,
            min_expert_tokens=DEFAULT_MIN_EXPERT_TOKENS if args.min_expert_tokens is None else args.min_expert_tokens,
            activation_budget=budget, resume=not args.restart, progress=not args.no_progress and rank == 0,
            distributed=ctx is not None, keep_results=False,  # the summary reads losses, not per-block tensors
            **({"gptq_scales": args.gptq_scales, "gptq_damp": args.gptq_damp} if args.method == "gptq" else {}),
        )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, OSError, ImportError, NotImplementedError,
            RuntimeError) as e:
        if tracing():  # where it failed, for a bug report
            traceback.print_exc()
        return _fail(str(e).strip("'\"")) if rank == 0 else 2
    if rank != 0:
        return 0
    t = rep.timings
    trace("streamed")
    _allocator_trace(device)
    phases = {"startup": startup, **_wait_phase(args, waited), "setup + data": t.get("setup", 0.0),
              "embed": t.get("embed", 0.0), "read": t.get("read", 0.0), "forward + capture": t.get("forward", 0.0),
              "search": t.get("search", 0.0), "write": t.get("write", 0.0), "other": t.get("other", 0.0),
              "total": startup + waited + t["total"]}
    n_batches = -(-args.samples // args.batch_size)
    header = (f"fp4cal quantize: {label or model_path.name} ({rep.description}), method {args.method}, "
              f"{args.samples} x {args.seq_len} tokens ({n_batches} batches), {device}")
    if ctx is not None:
        header += f", {world} processes (timings of rank 0)"
    if args.out is not None:
        header += f"\nwrote {args.format} checkpoint to {args.out}"
    if getattr(args, "warmup_seconds", None) is not None:
        header += f"\nkernel compilation: {args.warmup_seconds:.2f} s in a background thread, started before loading"
    where = "device" if rep.activations_on_device else "pinned CPU memory"
    header += (f"\npath: streaming, {rep.layers} layers, propagation {rep.propagation} ({why}); activations "
               f"{_gib(rep.activation_bytes)} in {where}")
    if rep.resumed_layers:
        header += f"; resumed after {rep.resumed_layers} committed layers"
    bg = ", ".join(f"{k} {v:.2f} s" for k, v in rep.background.items())
    by_phase = ""
    if rep.peak_gpu_by_phase:
        by_phase = "\npeak GPU memory by phase: " + ", ".join(
            f"{k} {_gib(v)}" for k, v in rep.peak_gpu_by_phase.items())
    print(calibration_summary(rep.result, header, phases) + f"\nbackground threads (overlapped): {bg}\n"
          + _memory_line(device, rep.peak_gpu_bytes, rep.anon_cpu_bytes) + by_phase)
    return 0
