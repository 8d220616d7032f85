"""quantize_checkpoint(): a checkpoint directory on disk -> an NVFP4 checkpoint, one decoder layer at a time.

    skeleton on meta (config.json) ─► modules outside the layers loaded ─► one forward per batch records what
    every decoder layer is called with (inputs.capture_layer_inputs)
    for each decoder layer i (its tensors read in a background thread while layer i-1 computes):
        load ─► run the batches under ActivationCapture (the hooks calibrate() uses) ─► solve() ─► the layer's
        checkpoint tensors (export.exporter.entry_tensors) committed by a background thread (staging.Staging)
        ─► outputs: from that same pass (propagation="float") or from the fake-quantized layer ("quantized")
        ─► next inputs ; layer freed
    tensors outside the layers ─► written as export writes them ; config & tokenizer ─► rename to out_dir

Memory: one or two decoder layers (the one computing, the one being read), the modules outside the layers,
the statistics, and two copies of the activations (inputs and outputs of the current layer: on the device
or in pinned CPU memory, see ``activation_budget``).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fp4cal.calib.calibrate import (
    CALIB_METHODS,
    DEFAULT_MIN_EXPERT_TOKENS,
    calibration_forward_kwargs,
    prepare_targets,
    quantized_weight,
    solve,
)
from fp4cal.calib.capture import ActivationCapture
from fp4cal.calib.result import CalibrationResult, WeightResult
from fp4cal.calib.targets import DEFAULT_EXCLUDE, Target
from fp4cal.export.check import check_export
from fp4cal.export.exporter import (
    FORMATS,
    Entry,
    checkpoint_entries,
    entry_tensors,
    fused_checks,
    ignore_list,
    model_tensors,
    write_side_files,
)
from fp4cal.export.io import check_out_dir, parse_size
from fp4cal.gptq import DEFAULT_DAMP, DEFAULT_SCALES, GPTQConfig
from fp4cal.stream import inputs as layer_inputs
from fp4cal.stream.reader import CheckpointReader, Prefetcher, pin, to_device, to_host_async
from fp4cal.stream.skeleton import (
    build_skeleton,
    config_bytes,
    find_layers,
    init_non_persistent_buffers,
    release,
    set_tensor,
    tensor_owners,
)
from fp4cal.stream.staging import Staging, fingerprint_hash, tensor_digest

PROPAGATIONS = ("float", "quantized")


@dataclass
class StreamReport:
    """What a streamed run did.

    result: the CalibrationResult (as calibrate() returns it). out_dir: the written checkpoint (None when not
    exporting). timings: seconds per phase of the calling thread, adding up to "total": setup (skeleton,
    plan, data), embed (the forward that records the layers' inputs), read (waiting for layer tensors),
    forward (layer forwards with capture, and the quantized re-run), search, write (packing plus waiting for
    the writer), other. background: seconds the reading / writing threads were busy (overlapped).
    peak_gpu_bytes: torch.cuda.max_memory_allocated over the run (None on CPU; the engine restarts CUDA's peak
    counter at each phase boundary), peak_gpu_by_phase: the same per phase; peak_cpu_bytes: the process's max RSS (which
    counts the checkpoint's file pages the reader maps); anon_cpu_bytes: the largest anonymous resident memory
    seen at a phase boundary (the process's own memory; None off Linux).
    resumed_layers: layers taken from an earlier, interrupted run. activations_on_device: where the layer
    inputs / outputs were kept. propagation: "float" or "quantized", as run.
    """

    result: CalibrationResult
    out_dir: Path | None
    description: str
    timings: dict[str, float] = field(default_factory=dict)
    background: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: int | None = None
    peak_gpu_by_phase: dict[str, int] = field(default_factory=dict)
    peak_cpu_bytes: int = 0
    anon_cpu_bytes: int | None = None
    resumed_layers: int = 0
    layers: int = 0
    activations_on_device: bool = True
    activation_bytes: int = 0
    propagation: str = "float"


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.t: dict[str, float] = {}
        self.peak: dict[str, int] = {}  # peak GPU bytes allocated per phase
        self.anon: int | None = None  # largest anonymous CPU memory seen at a phase boundary

    def add(self, phase: str, since: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # CUDA's peak counter restarts at every phase boundary, so the report can say which phase set it
            self.peak[phase] = max(self.peak.get(phase, 0), torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        anon = anon_cpu_bytes()
        if anon is not None:
            self.anon = max(self.anon or 0, anon)
        now = time.perf_counter()
        self.t[phase] = self.t.get(phase, 0.0) + now - since
        return now


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def peak_cpu_bytes() -> int:
    """The process's peak resident set size in bytes (Linux ru_maxrss)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def anon_cpu_bytes() -> int | None:
    """The process's anonymous resident memory now, in bytes (Linux RssAnon; None elsewhere): its own memory,
    without the file pages the checkpoint reader maps (counted in the resident set, reclaimed by the kernel as
    needed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def fake_quantize_weights(targets: list[Target], weights: dict[str, WeightResult]) -> None:
    """Replace each target's weight in place by its quantized value (fake_quantize_model for one layer):
    WeightResult.codes when set (GPTQ), else round-to-nearest with the chosen scales (quantized_weight)."""
    with torch.no_grad():
        for t in targets:
            wr = weights.get(t.name)
            if wr is None:
                continue
            w = t.param.transpose(-1, -2) if wr.transposed else t.param
            w.copy_(quantized_weight(w.detach(), wr))


def _batches_from_text(model_dir: Path, texts, samples: int, seq_len: int, batch_size: int, cache: bool):
    from fp4cal.stream.data import cached_calibration_batches

    return cached_calibration_batches(model_dir, texts, samples, seq_len, batch_size, use_cache=cache)


def _token_count_and_ids(batches: Sequence) -> tuple[int, list[torch.Tensor]]:
    tokens, ids = 0, []
    for b in batches:
        x = b.get("input_ids") if isinstance(b, dict) else (b[0] if isinstance(b, (tuple, list)) else b)
        if not isinstance(x, torch.Tensor):
            raise TypeError("streaming needs batches of input_ids tensors (a tensor, a tuple whose first item is "
                            f"one, or a dict with 'input_ids'), got {type(b).__name__}")
        tokens += x.numel()
        ids.extend(v for v in (b.values() if isinstance(b, dict) else [b] if isinstance(b, torch.Tensor) else b)
                   if isinstance(v, torch.Tensor))
    return tokens, ids


def quantize_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    batches: Sequence | None = None,
    *,
    texts=None,
    samples: int = 32,
    seq_len: int = 128,
    batch_size: int = 8,
    method: str = "local_hessian",
    format: str = "compressed-tensors",
    propagation: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    exclude: Sequence[str] | str | None = DEFAULT_EXCLUDE,
    include: Sequence[str] | str | None = None,
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
    w4a4: bool = False,
    max_shard_size: int | str = "5GB",
    activation_budget: int | str | Callable[[], int | str | None] | None = None,
    overwrite: bool = False,
    resume: bool = True,
    data_cache: bool = True,
    progress: bool = False,
    backend: str | None = None,
    gptq_scales: str | None = None,
    gptq_damp: float = DEFAULT_DAMP,
    distributed: bool = False,
    keep_results: bool = True,
) -> StreamReport:
    """Calibrate and export the checkpoint in ``model_dir`` one decoder layer at a time; see the module docstring.

    model_dir: a Hugging Face directory (config.json + safetensors shards, index or single file).
    out_dir: where the NVFP4 checkpoint goes (None: calibrate only). Appears only when complete; the work is
        staged beside it (.<name>.fp4cal-stream) and a killed run resumes there when re-run with the same
        arguments (resume=False discards it).
    batches: calibration batches (tensors, tuples, or dicts of model inputs, as calibrate() takes), or None to
        tokenize ``texts`` (fp4cal.calib.data sources; None: the bundled Shakespeare) with the model's
        tokenizer into ``samples`` x ``seq_len`` tokens in batches of ``batch_size`` (cached by content hash
        unless data_cache=False, see fp4cal.stream.data).
    propagation: "float" (each layer sees the unquantized outputs of the layers before it; with the same
        batches the result equals calibrate() + export() bit for bit) or "quantized" (it sees the outputs of
        the already fake-quantized layers). Default: "quantized" for method "gptq" (each layer's GPTQ then
        corrects for the error of the quantized layers before it), "float" otherwise.
    gptq_scales / gptq_damp: method "gptq" only, as calibrate() takes them.
    activation_budget: bytes (or "8GB") of device memory the layer inputs and outputs may take; above it they
        are kept in pinned CPU memory; or a function returning that, called once the data is ready. Default: a
        quarter of the device's free memory (CPU: always in memory).
    distributed: every rank of the initialized default process group calls this with the same arguments (one
        GPU each, or gloo on the CPU): rank r forwards batches[r::world] through every layer, each layer's
        statistics are all-reduced (float64 Hessian sums) and its weights searched in parallel across the ranks
        (fp4cal.calib.distributed), so the scales equal one process's bit for bit; rank 0 alone writes (and
        resumes) the checkpoint. Methods max / mse / local_hessian, float propagation. Every rank returns the
        full result.
    keep_results: False: once a layer is done, its results keep their losses, token counts and fallbacks but
        their per-block tensors (block_amax, block_scale, GPTQ codes) become meta tensors of the same shapes
        (WeightResult.without_blocks), so CPU memory does not grow with the model: those tensors are 1/8 of the
        bf16 weights' bytes (1/4 more with GPTQ codes), ~170 GB for a 671B MoE. For callers that need only the
        written checkpoint and the summary (the CLI).
    Other arguments as for calibrate() and export(). Returns a StreamReport.
    """
    t_start = time.perf_counter()
    if method not in CALIB_METHODS:
        raise ValueError(f"method must be one of {CALIB_METHODS}, got {method!r}")
    # bad GPTQ options fail before any work
    gptq = GPTQConfig(gptq_scales or DEFAULT_SCALES, gptq_damp) if method == "gptq" else None
    if propagation is None:
        propagation = "quantized" if method == "gptq" else "float"
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    if propagation not in PROPAGATIONS:
        raise ValueError(f"propagation must be one of {PROPAGATIONS}, got {propagation!r}")
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        from fp4cal.calib import distributed as fd

        if not dist.is_initialized():
            raise ValueError("distributed=True needs an initialized default process group (torch.distributed)")
        rank, world = dist.get_rank(), dist.get_world_size()
        if method == "gptq" or propagation != "float":
            raise NotImplementedError("distributed streaming supports max / mse / local_hessian with float "
                                      f"propagation, got method {method!r}, propagation {propagation!r}")
    model_dir = Path(model_dir)
    dev = _resolve_device(device)
    clock = _Clock(dev)
    # no CUDA call before the setup phase ends: the CUDA context is being created meanwhile (the CLI's kernel
    # warm-up thread does it), while this thread builds the skeleton and reads the data
    shard_bytes = parse_size(max_shard_size)
    if out_dir is not None and rank == 0:
        check_out_dir(out_dir, overwrite)  # fail before any work: unsafe paths, non-checkpoint dirs

    def together(fn, what: str):
        """fn() on every rank; under distributed, a failure on one rank is raised on all (never a hang)."""
        return fd.agree(fn, None, what) if distributed else fn()

    def reduce_(stats) -> None:
        if distributed:
            fd.reduce_statistics(stats, dev)

    def solve_(layer_targets_, stats) -> dict[str, WeightResult]:
        if distributed:
            return fd.solve_distributed(layer_targets_, stats, method, min_expert_tokens, backend)[0].weights
        return solve(layer_targets_, stats, method, min_expert_tokens, backend=backend, gptq=gptq).weights

    model, desc = build_skeleton(model_dir, dtype)
    reader = CheckpointReader(model_dir)
    prefix, layers = find_layers(model)
    n_layers = len(layers)
    targets, skipped = prepare_targets(model, method, min_expert_tokens, exclude, include, stacklevel=2)
    if out_dir is not None:
        transposed = [t.name for t in targets if t.transposed]
        if transposed:
            raise NotImplementedError(
                f"export of expert stacks stored as [E, cin, cout] is not supported yet: {transposed[:3]}; "
                "pass out_dir=None to calibrate only")
    tensors = model_tensors(model)
    owners = tensor_owners(model)
    entries = checkpoint_entries(model, tensors, {})
    for e in entries:
        reader.check(e.name, e.pieces, e.tensor.dtype)
    unit_of = {}
    for e in entries:
        rest = e.name[len(prefix) + 1:] if e.name.startswith(prefix + ".") else None
        unit_of[e.name] = int(rest.split(".", 1)[0]) if rest is not None else n_layers
    layer_entries = [[e for e in entries if unit_of[e.name] == i] for i in range(n_layers + 1)]
    layer_targets = [[t for t in targets if unit_of.get(t.name, n_layers) == i] for i in range(n_layers + 1)]
    outside_targets = layer_targets[n_layers]

    # the modules the embedding pass needs (outside the layers, less an unquantized output head), then layer 0,
    # are read while the data is prepared and the embedding runs
    head_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip_head = {f"{n}" for n, p in (head_out.named_parameters(prefix=_module_name(model, head_out))
                                     if head_out is not None else [])} - {t.name for t in outside_targets}
    outside = [e for e in layer_entries[n_layers] if e.name not in skip_head]
    prefetch = Prefetcher()
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fp4cal-write")
    writes: list[Future] = []
    busy = {"read": 0.0, "write": 0.0}

    # where the reading thread leaves a layer: on the device (overlapping the copy too), or, when memory is
    # tight (activations in pinned memory), in pinned CPU memory until the layer's turn, so that only the
    # computing layer is on the device (the copy then costs ~10 ms per GB on the compute stream)
    read_to = {"device": False}

    def read_layer(i: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        cpu = _read_entries(reader, layer_entries[i])
        out = to_device(cpu, dev) if read_to["device"] else pin(cpu, dev)
        busy["read"] += time.perf_counter() - t0
        return out

    def commit(unit: int, items, results, ready=None) -> None:
        t0 = time.perf_counter()
        if ready is not None:  # the items' copies to the host (to_host_async)
            ready.synchronize()
        staging.commit(unit, items, results)
        busy["write"] += time.perf_counter() - t0

    prefetch.submit("outside", lambda: _read_entries(reader, outside))
    prefetch.submit(0, lambda: read_layer(0))
    try:

        if batches is None:
            batches = _batches_from_text(model_dir, texts, samples, seq_len, batch_size, data_cache)
        batches = list(batches)
        if not batches:
            raise ValueError("batches was empty: calibration needs at least one batch")
        n_tokens, ids = _token_count_and_ids(batches)  # every rank's ids: the fingerprint covers the whole data
        n_batches = len(batches)
        if distributed:  # this rank's share decides where its activations live
            batches = fd.shard(batches, rank, world)
            n_tokens, _ = _token_count_and_ids(batches)
        hidden = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                         "hidden_size", 0)
        # a layer's inputs and outputs: each input batch is freed once its output exists (_run_layer's consume),
        # so one set plus the largest batch, not two sets
        biggest = max(_token_count_and_ids([b])[0] for b in batches)
        elt = torch.empty((), dtype=entries[0].tensor.dtype).element_size()
        act_bytes = (n_tokens + biggest) * int(hidden or 0) * elt
        if callable(activation_budget):  # decided now rather than by the caller before the setup
            activation_budget = activation_budget()
        if dev.type == "cuda":
            if activation_budget is None:
                budget = torch.cuda.mem_get_info(dev)[0] // 4
            elif isinstance(activation_budget, int) and activation_budget <= 0:
                budget = 0  # everything in pinned CPU memory
            else:
                budget = parse_size(activation_budget, "activation_budget")
            on_device = act_bytes <= budget
        else:
            on_device = True
        store = layer_inputs.ActivationStore(dev, on_device)
        read_to["device"] = on_device

        staging = None
        if out_dir is not None:
            fp = {
                "model_dir": str(model_dir.absolute()),
                "config": fingerprint_hash({"config": config_bytes(model_dir).decode(errors="replace")}),
                "shards": reader.shard_sizes(),
                "method": method, "format": format, "propagation": propagation, "w4a4": w4a4,
                "gptq": None if gptq is None else [gptq.scales, gptq.damp],
                "dtype": str(entries[0].tensor.dtype), "exclude": list(exclude or []) if not isinstance(exclude, str)
                else [exclude], "include": include, "min_expert_tokens": min_expert_tokens,
                "max_shard_bytes": shard_bytes, "data": tensor_digest(ids),
            }
            if rank == 0:  # one writer; a refusal (another job's staging) reaches every rank
                staging = together(lambda: Staging(Path(out_dir), fp, shard_bytes, resume=resume), "staging")
            else:
                together(lambda: None, "staging")
        committed = set(staging.units) if staging is not None else set()
        if distributed:
            box = [sorted(committed)]
            dist.broadcast_object_list(box, src=0)
            committed = set(box[0])
        if staging is not None and not outside_targets and n_layers not in committed:
            # nothing outside the layers is quantized (the usual case: embeddings, norm, an excluded head): those
            # tensors are copies from the checkpoint, written first by the writer thread while the layers compute
            # rather than at the end (Qwen3-8B: 2.3 GiB, seconds of disk at the tail of the run)
            def outside_unit():
                commit(n_layers, _unit_tensors(layer_entries[n_layers], {}, format, w4a4, owners, reader), {})

            writes.append(writer.submit(outside_unit))
        t = clock.add("setup", t_start)

        # -- the modules outside the layers, and what the layers are called with --------------------------------
        for name, value in to_device(prefetch.take("outside"), dev).items():
            set_tensor(owners[name], value)
        _init_outside_buffers(model, layers, dev)
        extras = {**calibration_forward_kwargs(model, targets), **layer_inputs.forward_extras(model)}
        hessians, full = method == "local_hessian", method == "gptq"
        with ActivationCapture(model, outside_targets, hessians, full_hessians=full) as cap_out:
            def first_pass():
                out = layer_inputs.capture_layer_inputs(model, layers, batches, dev, store, extras)
                cap_out.check()
                return out

            captured = together(first_pass, "the embedding pass")
        reduce_(cap_out.stats)
        # the modules outside the layers leave the device until the end (re-read there for writing)
        _unload([e for e in outside if e.name not in {tg.name for tg in outside_targets}], owners)
        head_targets = [t for t in outside_targets if _reached(t, cap_out.stats)]
        tail_targets = [t for t in outside_targets if not _reached(t, cap_out.stats)]
        weights: dict[str, WeightResult] = {}
        if head_targets:
            weights.update(solve_(head_targets, cap_out.stats))
            if propagation == "quantized":  # layer 0 must see the quantized modules before it
                fake_quantize_weights(head_targets, weights)
                captured = layer_inputs.capture_layer_inputs(model, layers, batches, dev, store, extras)
        t = clock.add("embed", t)

        hidden_states = captured.hidden
        resumed = 0
        iterator = range(n_layers)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="streaming layers", unit="layer")
        for i in iterator:
            if i + 1 < n_layers:
                prefetch.submit(i + 1, lambda j=i + 1: read_layer(j))
            loaded = prefetch.take(i)
            layer = layers[i]
            for name, value in loaded.items():
                if value.device != dev:  # read into pinned memory: copied now, on the compute stream
                    value = value.to(dev, non_blocking=True)
                elif dev.type == "cuda":
                    value.record_stream(torch.cuda.current_stream(dev))
                set_tensor(owners[name], value)
            init_non_persistent_buffers(model, layer.modules(), dev)
            del loaded
            t = clock.add("read", t)
            calls = captured.calls[i]
            done = i in committed
            layer_cpu = None  # the layer's results on the CPU, once copied
            if done:  # resumed: this layer's results are on disk; only its outputs are needed
                resumed += 1
                layer_w = _load_committed(staging, i, dev, distributed)
                weights.update(layer_w)
                if propagation == "quantized":
                    fake_quantize_weights(layer_targets[i], layer_w)
                outputs = _run_layer(layer, hidden_states, calls, store, dev, keep=True, consume=True)
                t = clock.add("forward", t)
            else:
                probe = _memory_probe(layer, i) if (dev.type == "cuda" and i == resumed
                                                    and os.environ.get("FP4CAL_TRACE")) else None
                with ActivationCapture(layer, layer_targets[i], hessians, full_hessians=full) as cap:
                    def layer_pass(layer=layer, hidden_states=hidden_states, calls=calls, cap=cap):
                        out = _run_layer(layer, hidden_states, calls, store, dev, keep=propagation == "float",
                                         consume=propagation == "float")
                        cap.check()
                        return out

                    outputs = together(layer_pass, f"layer {i}")
                reduce_(cap.stats)
                if probe is not None:
                    probe()
                t = clock.add("forward", t)
                layer_w = solve_(layer_targets[i], cap.stats)
                del cap
                weights.update(layer_w)
                t = clock.add("search", t)
                if staging is not None:
                    items = _unit_tensors(layer_entries[i], layer_w, format, w4a4, owners)
                    # to the host on a side stream: a copy by the writer thread would run on the compute stream,
                    # into pageable memory, stalling the next layer's kernels
                    host, ready = to_host_async([t for _, t, _ in items], dev)
                    items = [(n, h, m) for (n, _, m), h in zip(items, host, strict=True)]
                    layer_cpu = _on_cpu(layer_w)  # the writer makes no CUDA call
                    writes.append(writer.submit(commit, i, items, layer_cpu, ready))
                if out_dir is not None:  # a failed write on rank 0 stops every rank here
                    together(lambda: _raise_failed(writes), "writing")
                    t = clock.add("write", t)
                if propagation == "quantized":
                    fake_quantize_weights(layer_targets[i], layer_w)
                    outputs = _run_layer(layer, hidden_states, calls, store, dev, keep=True, consume=True)
                    t = clock.add("forward", t)
            release(layer)
            store.sync()
            hidden_states = outputs
            if not keep_results:  # the writer holds its own references to what it writes
                weights.update({k: v.without_blocks() for k, v in (layer_cpu or layer_w).items()})
            elif dev.type == "cuda":  # a layer's scales (~1/8 of its bf16 bytes; GPTQ codes 1/4 more) leave the
                # device: kept there, 36 layers' results held ~2 GiB of a Qwen3-8B run's 4 GiB peak (measured)
                weights.update(layer_cpu if layer_cpu is not None else _on_cpu(layer_w))
            del layer_w
        t = clock.add("other", t)

        # -- outside the layers: the tail pass (weights after the layers), their tensors, the side files --------
        if n_layers in committed:
            weights.update(_load_committed(staging, n_layers, dev, distributed))  # resumed after the last unit
        elif tail_targets:
            _load_into(model, [e for e in layer_entries[n_layers] if _current(owners[e.name]).is_meta],
                       owners, reader, dev)
            with ActivationCapture(model, tail_targets, hessians, full_hessians=full) as cap_tail:
                def tail_pass():
                    layer_inputs.replay_outputs(model, layers, hidden_states, store, batches, dev, extras)
                    cap_tail.check()

                together(tail_pass, "the pass after the layers")
            reduce_(cap_tail.stats)
            t = clock.add("forward", t)
            weights.update(solve_(tail_targets, cap_tail.stats))
            t = clock.add("search", t)
        out_path = None

        def finish_writing():
            for f in writes:  # every layer, and the outside unit when it was written first
                f.result()
            if not staging.committed(n_layers):
                outside_w = {tg.name: weights[tg.name] for tg in outside_targets}
                items = _unit_tensors(layer_entries[n_layers], outside_w, format, w4a4, owners, reader)
                commit(n_layers, items, outside_w)
            ignore = ignore_list(model, entries, {tg.name for tg in targets})
            moe = any(tg.kind == "experts" for tg in targets)
            write_side_files(model, staging.ckpt, format, ignore, w4a4, model_dir, moe=moe)
            staging.finalize_shards()
            check_export(staging.ckpt, format)  # what the engines' loaders need; raises before the rename
            return staging.publish(overwrite)

        if out_dir is not None:
            if distributed:  # rank 0 writes, the others wait (with a timeout fit for a long write)
                fd.run_on_rank0(finish_writing)
                out_path = Path(out_dir)
            else:
                out_path = finish_writing()
            t = clock.add("write", t)
    finally:
        prefetch.close()
        writer.shutdown(wait=True)

    result = CalibrationResult(method=method, forward_calls=n_batches)
    result.weights = {tg.name: weights[tg.name] for tg in targets}
    result.skipped = skipped
    clock.t["total"] = time.perf_counter() - t_start
    clock.t["other"] = clock.t.get("other", 0.0) + clock.t["total"] - sum(
        v for k, v in clock.t.items() if k not in ("total", "other")) - clock.t.get("other", 0.0)
    result.timings = dict(clock.t)
    return StreamReport(
        result=result, out_dir=out_path, description=desc, timings=dict(clock.t), background=dict(busy),
        peak_gpu_bytes=max([torch.cuda.max_memory_allocated(dev), *clock.peak.values()]) if dev.type == "cuda"
        else None,
        peak_gpu_by_phase=dict(clock.peak),
        peak_cpu_bytes=peak_cpu_bytes(), anon_cpu_bytes=clock.anon, resumed_layers=resumed, layers=n_layers,
        activations_on_device=on_device, activation_bytes=act_bytes, propagation=propagation,
    )


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _reached(t: Target, stats) -> bool:
    if t.kind == "linear":
        slot = stats.inputs.get(t.module_name)
        return slot is not None and slot.tokens > 0
    st = stats.experts.get(t.module_name)
    return st is not None and int(st.counts.sum()) > 0


def _init_outside_buffers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    inside = {id(m) for m in layers.modules()}
    init_non_persistent_buffers(model, [m for m in model.modules() if id(m) not in inside], device)


def _read_entries(reader: CheckpointReader, entries: list[Entry]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``entries`` read into CPU memory, by model tensor name."""
    return {e.name: reader.read(e.name, tuple(e.tensor.shape), e.tensor.dtype, e.pieces) for e in entries}


def _on_cpu(weights: dict[str, WeightResult]) -> dict[str, WeightResult]:
    return {k: v.to("cpu") for k, v in weights.items()}


def _load_into(model, entries: list[Entry], owners, reader: CheckpointReader, device: torch.device) -> None:
    for name, value in to_device(_read_entries(reader, entries), device).items():
        set_tensor(owners[name], value)


def _current(owner: list[tuple[nn.Module, str, bool]]) -> torch.Tensor:
    """The tensor a module holds now for one model tensor (meta when not loaded)."""
    module, attr, is_param = owner[0]
    return module._parameters[attr] if is_param else module._buffers[attr]


def _unload(entries: list[Entry], owners) -> None:
    for e in entries:
        set_tensor(owners[e.name], torch.empty(tuple(e.tensor.shape), dtype=e.tensor.dtype, device="meta"))


def _memory_probe(layer: nn.Module, index: int):
    """FP4CAL_TRACE: hooks on the layer's direct children print, for its first batch, the device memory
    allocated after each child and CUDA's peak so far in the phase (where a layer's peak comes from); returns
    the function that removes them."""
    handles, seen = [], set()

    def after(name: str):
        def hook(mod, args, out):
            if name in seen:
                return
            seen.add(name)
            torch.cuda.synchronize()
            print(f"[fp4cal memory] layer {index} {name}: allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, "
                  f"peak so far {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        return hook

    for name, child in layer.named_children():
        handles.append(child.register_forward_hook(after(name)))

    def remove() -> None:
        for h in handles:
            h.remove()
    return remove


def _run_layer(layer: nn.Module, hidden: list[torch.Tensor], calls, store, device: torch.device, keep: bool,
               consume: bool = False):
    """Run every batch through one layer; returns the outputs (in the store) when ``keep``. Batch b + 1's
    inputs are copied to the device while batch b computes (pinned store). ``consume``: the inputs are not
    needed again, so hidden[b] is dropped (set to None) once batch b's output exists: a layer then holds one set
    of activations plus a batch rather than two sets (the memory is reused by the next outputs; a pinned block
    only after its copy has completed, which the host allocator tracks)."""
    outs = []
    store.sync()  # the previous pass's outputs (this pass's inputs) are all in the store
    with torch.no_grad():
        nxt = store.fetch(hidden[0]) if hidden else None
        for b in range(len(hidden)):
            h = store.use(nxt)
            if b + 1 < len(hidden):
                nxt = store.fetch(hidden[b + 1])
            args, kwargs = calls[b]
            memo: dict = {}
            out = layer(h, *layer_inputs.unpack(args, device, memo), **layer_inputs.unpack(kwargs, device, memo))
            del h
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{type(layer).__name__} returned {type(out).__name__}, expected the hidden-states "
                                "tensor (transformers >= 5 decoder layers); streaming cannot follow this model")
            if keep:
                outs.append(store.put(out))
            del out
            if consume:
                hidden[b] = None
    return outs if keep else None


def _unit_tensors(entries: list[Entry], weights: dict[str, WeightResult], format: str, w4a4: bool, owners,
                  reader: CheckpointReader | None = None) -> list[tuple[str, torch.Tensor, dict | None]]:
    """Checkpoint tensors of one unit (a layer, or everything outside the layers), in model order. Tensors
    still on the meta device (outside the layers and never needed on the device) are read on the CPU."""
    input_amax = fused_checks(weights, w4a4)
    items = []
    for e in entries:
        value = _current(owners[e.name])
        if value.is_meta:
            if reader is None:
                raise RuntimeError(f"{e.name} is not loaded")
            value = reader.read(e.name, tuple(e.tensor.shape), e.tensor.dtype, e.pieces)
        entry = Entry(e.name, value, e.pieces, weights.get(e.name))
        items.extend(entry_tensors(entry, format, w4a4, input_amax.get(e.name)))
    return items


def _load_committed(staging, unit: int, device: torch.device, distributed: bool) -> dict[str, WeightResult]:
    """A committed unit's results, read by the writer (rank 0) and, under distributed, sent to every rank."""
    if not distributed:
        return staging.load_results(unit, device)
    import torch.distributed as dist

    box = [None]
    if staging is not None:
        box = [{n: wr.to_dict(fp8_as_bytes=True) for n, wr in staging.load_results(unit, torch.device("cpu")).items()}]
    dist.broadcast_object_list(box, src=0)
    return {n: WeightResult.from_dict(d, device) for n, d in box[0].items()}


def _raise_failed(futures: list[Future]) -> None:
    for f in futures:
        if f.done() and f.exception() is not None:
            raise f.exception()
