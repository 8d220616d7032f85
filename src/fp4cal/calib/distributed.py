"""Calibration across several processes (GPUs) with torch.distributed: data-parallel capture, layer-parallel search.

    torchrun --standalone --nproc-per-node 8 -m fp4cal quantize MODEL_DIR --out OUT_DIR      (or --nproc 8)

or, in a script run under torchrun (each rank: same model, same seed / checkpoint, its own GPU):

    dist.init_process_group("nccl"); torch.cuda.set_device(local_rank)
    result = calibrate_distributed(model, batches, "local_hessian")   # every rank passes the SAME batch list
    run_on_rank0(lambda: fp4cal.export(result, model, out_dir))      # rank 0 writes, the others wait

The steps, every rank running each one (a collective is never entered by some ranks only):

1. check_same_model: names, shapes and dtypes of every parameter, the targets, each target's max |w| and the
   call's arguments are compared across ranks (all_gather_object); any difference is a ValueError on every
   rank that names the parameter and the ranks.
2. capture on this rank's shard, batches[rank::world]: the same per-batch code as calibrate().
3. reduce_statistics: Hessian sums (float64) and token counts SUM, activation amax MAX, MoE routed-token counts
   SUM, so that every rank holds the statistics of the whole data.
4. layer-parallel search: assign_owners splits the targets by cost (weights x candidates x method factor,
   longest first onto the least-loaded rank); each rank runs solve_target on its own share; the owner of each
   weight broadcasts its block amax and codes, and all_gather_object sends the scalars, so every rank ends
   with the full CalibrationResult.

Why the result equals a single-process calibrate() bit for bit: every batch goes through the same forward and
the same per-batch fp32 products on one rank or another; amax (MAX) and counts (integers) reduce exactly in
any order; Hessian sums are accumulated in float64 on every path (HessianAccumulator), so different
groupings of the same per-batch partial sums differ at most by float64 rounding, which the fp32 rounding of
H / n hides (docs/distributed.md gives the argument and its limit). The search of one weight is the same
function on the same inputs wherever it runs. A failure on one rank (non-finite activations, an out-of-memory
search) is reported to every rank (all_gather_object of the error), never left to hang the others.
"""

from __future__ import annotations

import datetime
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
from torch import nn

from fp4cal.calib.calibrate import (
    DEFAULT_MIN_EXPERT_TOKENS,
    capture_pass,
    finish,
    group_global_amax,
    prepare_targets,
    solve_target,
)
from fp4cal.calib.capture import CaptureStats, ExpertStats, InputStats, model_device, sync_device
from fp4cal.calib.hessian import HessianAccumulator
from fp4cal.calib.result import CalibrationResult, WeightResult
from fp4cal.calib.targets import DEFAULT_EXCLUDE, Target
from fp4cal.numerics import N_SCALE_CANDIDATES
from fp4cal.search import METHODS

T = TypeVar("T")

# Relative search cost per weight element: the sweep tries the 126 FP8 candidates; the local-Hessian kernel
# evaluates a 16x16 quadratic form per block and candidate, about 2x the squared error's work; 'max' only
# takes a block max (plus the two objective evaluations every method pays, ~2 candidate-equivalents).
CANDIDATES = N_SCALE_CANDIDATES
METHOD_COST = {"max": 2.0, "mse": CANDIDATES + 2.0, "local_hessian": 2.0 * CANDIDATES + 2.0}

# Elements per coalesced all_reduce (256 MiB of float64): big enough that many small Hessians go in one call,
# small enough that the staging copy stays a fraction of the statistics it reduces.
_BUCKET_ELEMS = 1 << 25


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    return dist


def _group_info(group) -> tuple[int, int]:
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError(
            "calibrate_distributed needs an initialized process group: launch with torchrun (or "
            "torch.multiprocessing) and call torch.distributed.init_process_group first (nccl on GPUs, gloo on CPU)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group=None) -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, the CPU for gloo (and others)."""
    dist = _dist()
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _global_rank(group, rank: int) -> int:
    dist = _dist()
    return rank if group is None else dist.get_global_rank(group, rank)


def _all_gather(obj, group=None) -> list:
    dist = _dist()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def first_error(err: str | None, group=None) -> str | None:
    """Every rank passes its own error message (None when it is fine); every rank gets the message of the
    lowest failing rank, prefixed with "rank r: ", or None when no rank failed. A collective: all ranks call."""
    errors = _all_gather(err, group)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None), None)


def agree(fn: Callable[[], T], group=None, what: str = "calibration") -> T:
    """Run ``fn`` on every rank, then tell every rank whether any failed (all_gather_object of the error).

    The rank that failed re-raises its own exception; the others raise RuntimeError naming that rank and its
    error. Used around every step that runs no collective itself but can fail on one rank only, so that a
    failure never leaves the other ranks waiting in the next collective."""
    err, exc = None, None
    out = None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
        err, exc = f"{type(e).__name__}: {e}", e
    first = first_error(err, group)
    if exc is not None:
        raise exc
    if first is not None:
        rank, _, msg = first.partition(": ")
        raise RuntimeError(f"{what} failed on {rank}: {msg}")
    return out


def run_on_rank0(
    fn: Callable[[], T], group=None, timeout: datetime.timedelta = datetime.timedelta(hours=4)
) -> T | None:
    """``fn()`` on rank 0 only (e.g. writing the checkpoint), the other ranks waiting for it; an error on
    rank 0 is raised on every rank. Returns fn's value on rank 0, None elsewhere.

    The others wait in a collective of a gloo group made for the purpose with ``timeout``: writing a large
    checkpoint can outlast the group's own timeout (the NCCL watchdog's 10 minutes by default, which would
    kill a rank that waits in an NCCL collective; gloo's 30 minutes)."""
    dist = _dist()
    rank, _ = _group_info(group)
    ranks = None if group is None else dist.get_process_group_ranks(group)
    wait_group = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)
    try:
        return agree(fn if rank == 0 else (lambda: None), wait_group, what="rank-0 step")
    finally:
        dist.destroy_process_group(wait_group)


# -- 1. same model everywhere ----------------------------------------------------------------------------------


def _model_fingerprint(model: nn.Module, targets: list[Target], config: dict) -> dict:
    params = [(n, tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in model.named_parameters()]
    amax = [t.weight().abs().amax().float().reshape(1) for t in targets]
    # one device-to-host copy for all targets; max |w| is a cheap fingerprint of the values (a different seed
    # or checkpoint changes it almost surely) that the search needs anyway
    amax_list = torch.cat(amax).cpu().tolist() if amax else []
    return {"params": params, "targets": [t.name for t in targets], "amax": amax_list, "config": config}


def _differences(a: dict, b: dict, ra: int, rb: int, limit: int = 5) -> list[str]:
    out: list[str] = []
    pa = {n: (s, d) for n, s, d in a["params"]}
    pb = {n: (s, d) for n, s, d in b["params"]}
    for n in [n for n in pa if n not in pb][:limit]:
        out.append(f"parameter {n} exists on rank {ra} but not on rank {rb}")
    for n in [n for n in pb if n not in pa][:limit]:
        out.append(f"parameter {n} exists on rank {rb} but not on rank {ra}")
    for n in pa:
        if n in pb and pa[n] != pb[n]:
            (sa, da), (sb, db) = pa[n], pb[n]
            out.append(f"parameter {n} is {da} {list(sa)} on rank {ra} but {db} {list(sb)} on rank {rb}")
    if not out and a["targets"] != b["targets"]:
        out.append(f"the quantized weights differ: {len(a['targets'])} on rank {ra}, {len(b['targets'])} on rank {rb}")
    if not out and a["amax"] != b["amax"]:
        i = next(i for i, (x, y) in enumerate(zip(a["amax"], b["amax"], strict=False)) if x != y)
        out.append(
            f"weight values differ: max |w| of {a['targets'][i]} is {a['amax'][i]!r} on rank {ra} but "
            f"{b['amax'][i]!r} on rank {rb} (same checkpoint / same seed on every rank?)"
        )
    for k in a["config"]:
        if a["config"][k] != b["config"].get(k):
            out.append(f"argument {k} is {a['config'][k]!r} on rank {ra} but {b['config'].get(k)!r} on rank {rb}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def check_same_model(model: nn.Module, targets: list[Target], config: dict | None = None, group=None) -> None:
    """Raise ValueError on every rank unless all ranks hold the same model: parameter names, shapes and
    dtypes, the quantized targets, each target's max |w|, and the call's arguments (``config``, any
    picklable dict). The message names the first differences and the ranks."""
    prints = _all_gather(_model_fingerprint(model, targets, config or {}), group)
    problems: list[str] = []
    for r in range(1, len(prints)):
        problems += _differences(prints[0], prints[r], 0, r)
    if problems:
        raise ValueError("ranks disagree on the model or the calibration arguments:\n  " + "\n  ".join(problems))


# -- 2. shard ---------------------------------------------------------------------------------------------------


def shard(batches: Sequence, rank: int, world: int) -> list:
    """This rank's batches: every world-th one starting at ``rank`` (balanced to within one batch)."""
    if not hasattr(batches, "__len__") or not hasattr(batches, "__getitem__"):
        raise TypeError(
            f"batches must be a sequence (list / tuple) that every rank passes whole, got {type(batches).__name__}; "
            "pass shard=False with this rank's own batches to shard them yourself"
        )
    return [batches[i] for i in range(rank, len(batches), world)]


# -- 3. reduce statistics ---------------------------------------------------------------------------------------


def _all_reduce_(tensors: list[torch.Tensor], op, group, comm: torch.device) -> None:
    """In-place all_reduce of same-dtype tensors, coalesced into buckets of at most _BUCKET_ELEMS elements."""
    dist = _dist()
    i = 0
    while i < len(tensors):
        j, size = i, 0
        while j < len(tensors) and (j == i or size + tensors[j].numel() <= _BUCKET_ELEMS):
            size += tensors[j].numel()
            j += 1
        chunk = tensors[i:j]
        i = j
        if size == 0:
            continue  # every rank has the same shapes, so every rank skips this bucket alike
        flat = torch.cat([t.reshape(-1).to(comm) for t in chunk])
        dist.all_reduce(flat, op=op, group=group)
        o = 0
        for t in chunk:
            t.copy_(flat[o : o + t.numel()].view(t.shape))
            o += t.numel()


def _stats_meta(stats: CaptureStats) -> dict:
    inputs = {}
    for slot in {id(s): s for s in stats.inputs.values()}.values():
        inputs[slot.name] = {"members": list(slot.members), "cin": slot.cin, "hessian": slot.hessian is not None}
    experts = {}
    for name, st in stats.experts.items():
        experts[name] = {
            "E": st.num_experts,
            "hessian": None if st.in_hessians is None else (st.in_hessians[0].cin, st.mid_hessians[0].cin),
            "amax": st.in_amax is not None,
        }
    return {"inputs": inputs, "experts": experts}


def _union_inputs(metas: list[dict]) -> dict[str, dict]:
    """Slot name -> meta over all ranks; raises (on every rank alike) when ranks grouped a module differently."""
    slots: dict[str, dict] = {}
    owner_of: dict[str, tuple[str, int]] = {}
    for r, m in enumerate(metas):
        for name, info in m["inputs"].items():
            for member in info["members"]:
                seen = owner_of.setdefault(member, (name, r))
                if seen[0] != name:
                    raise ValueError(
                        f"ranks captured {member} differently: it shares the input of {seen[0]} on rank {seen[1]} "
                        f"but of {name} on rank {r}"
                    )
            if name in slots and (slots[name]["members"], slots[name]["cin"]) != (info["members"], info["cin"]):
                raise ValueError(
                    f"ranks captured the input of {name} differently: members {slots[name]['members']} vs "
                    f"{info['members']} on rank {r}"
                )
            slots.setdefault(name, info)
    return dict(sorted(slots.items()))


def reduce_statistics(stats: CaptureStats, device: torch.device | None = None, group=None) -> CaptureStats:
    """Make ``stats`` (this rank's capture) hold the statistics of every rank's data, on every rank, in place.

    Hessian sums: float64 SUM; token counts and Hessian row counts: SUM; activation amax: MAX (0 where a rank
    saw nothing, amax >= 0 always); MoE routed-token counts: SUM; per-expert amax: MAX; forward_calls: SUM.
    Statistics a rank lacks (its shard never reached a layer, or it had no batch) are created empty first,
    so every rank enters the same collectives with the same shapes. device: where missing statistics are
    created (default: the CPU; the model's device is what calibrate_distributed passes). Returns ``stats``.
    """
    dist = _dist()
    comm = comm_device(group)
    device = torch.device("cpu") if device is None else device
    metas = _all_gather(_stats_meta(stats), group)
    slots_meta = _union_inputs(metas)

    # canonical slots, in sorted order; missing ones created empty
    local = {s.name: s for s in {id(s): s for s in stats.inputs.values()}.values()}
    slots: list[InputStats] = []
    for name, info in slots_meta.items():
        slot = local.get(name)
        if slot is None:
            acc = HessianAccumulator(info["cin"], device, name) if info["hessian"] else None
            slot = InputStats(name, info["cin"], acc, None, 0, list(info["members"]))
            for member in info["members"]:
                stats.inputs[member] = slot
        slots.append(slot)
    expert_names = sorted(set().union(*(m["experts"] for m in metas)))
    stacks: list[ExpertStats] = []
    for name in expert_names:
        info = next(m["experts"][name] for m in metas if name in m["experts"])
        st = stats.experts.get(name)
        if st is None:
            st = stats.experts[name] = ExpertStats(name, info["E"], torch.zeros(info["E"], dtype=torch.int64))
        hess = next((m["experts"][name]["hessian"] for m in metas if m["experts"].get(name, {}).get("hessian")), None)
        if hess is not None and st.in_hessians is None:
            st.in_hessians = [HessianAccumulator(hess[0], device, f"{name}[{e}] input") for e in range(st.num_experts)]
            st.mid_hessians = [
                HessianAccumulator(hess[1], device, f"{name}[{e}] intermediate") for e in range(st.num_experts)
            ]
        if any(m["experts"].get(name, {}).get("amax") for m in metas) and st.in_amax is None:
            st.in_amax = torch.zeros(st.num_experts, dtype=torch.float32, device=device)
            st.mid_amax = torch.zeros(st.num_experts, dtype=torch.float32, device=device)
        stacks.append(st)

    # float64 Hessian sums (SUM)
    sums = [s.hessian.sum64 for s in slots if s.hessian is not None]
    for st in stacks:
        if st.in_hessians is not None:
            sums += [a.sum64 for a in st.in_hessians] + [a.sum64 for a in st.mid_hessians]
    _all_reduce_(sums, dist.ReduceOp.SUM, group, comm)

    # integer counts (SUM): tokens and Hessian rows per slot, routed tokens and Hessian rows per expert
    counts = [stats.forward_calls]
    for s in slots:
        counts += [s.tokens, s.hessian.n if s.hessian is not None else 0]
    for st in stacks:
        counts += st.counts.tolist()
        if st.in_hessians is not None:
            counts += [a.n for a in st.in_hessians] + [a.n for a in st.mid_hessians]
    total = torch.tensor(counts, dtype=torch.int64)
    _all_reduce_([total], dist.ReduceOp.SUM, group, comm)
    it = iter(total.tolist())
    stats.forward_calls = next(it)
    for s in slots:
        s.tokens = next(it)
        n = next(it)
        if s.hessian is not None:
            s.hessian.n = n
    for st in stacks:
        st.counts = torch.tensor([next(it) for _ in range(st.num_experts)], dtype=torch.int64)
        if st.in_hessians is not None:
            for a in st.in_hessians + st.mid_hessians:
                a.n = next(it)

    # activation amax (MAX); a slot no rank saw keeps amax None, as in a single process
    seen = torch.tensor([0 if s.amax is None else 1 for s in slots], dtype=torch.int64)
    amax = torch.zeros(len(slots), dtype=torch.float32)
    for i, s in enumerate(slots):
        if s.amax is not None:
            amax[i] = s.amax.float().cpu()
    amax_parts = [amax] + [t for st in stacks if st.in_amax is not None for t in (st.in_amax, st.mid_amax)]
    _all_reduce_([seen], dist.ReduceOp.MAX, group, comm)
    _all_reduce_(amax_parts, dist.ReduceOp.MAX, group, comm)
    for s, flag, a in zip(slots, seen.tolist(), amax_parts[0], strict=True):
        s.amax = a.to(device if s.amax is None else s.amax.device).clone() if flag else None
    return stats


# -- 4. layer-parallel search -----------------------------------------------------------------------------------


def search_cost(t: Target, method: str) -> float:
    """Relative cost of searching one target: weight elements x METHOD_COST[method]."""
    return float(t.weight().numel()) * METHOD_COST[method]


def assign_owners(targets: list[Target], method: str, world: int) -> list[int]:
    """Owner rank of each target: longest-processing-time first (costliest target onto the least-loaded
    rank; ties by target order, then lowest rank). Deterministic, so every rank computes the same split."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    costs = [search_cost(t, method) for t in targets]
    load = [0.0] * world
    owners = [0] * len(targets)
    for i in sorted(range(len(targets)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


# Sent by broadcast as tensors (block_*), or recomputed by every rank (global_amax), not pickled.
_BROADCAST_FIELDS = ("block_amax", "block_scale", "global_amax")


def _scalars(wr: WeightResult) -> dict:
    """What the owner sends besides the block tensors (small; CPU tensors pickle portably)."""
    return wr.to_dict(exclude=_BROADCAST_FIELDS)


def solve_distributed(
    targets: list[Target],
    stats: CaptureStats,
    method: str = "local_hessian",
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
    backend: str | None = None,
    group=None,
    progress: bool = False,
) -> tuple[CalibrationResult, dict[str, float]]:
    """solve() split across ranks: each rank searches the targets assign_owners gives it, then every rank
    receives every WeightResult (owner broadcasts block_amax fp32 and block_scale codes; scalars by
    all_gather_object). ``stats`` must already be reduced. Returns (full result, {"search": s, "gather": s}).
    Fallback warnings are issued by the rank that searches the weight."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dist = _dist()
    rank, world = _group_info(group)
    comm = comm_device(group)
    amax = group_global_amax(targets)
    owners = assign_owners(targets, method, world)
    mine = [t for t, o in zip(targets, owners, strict=True) if o == rank]
    if progress and rank == 0:
        from tqdm.auto import tqdm

        mine_it: Iterable[Target] = tqdm(mine, desc=f"{method} scale search (rank 0's share)", unit="weight")
    else:
        mine_it = mine
    device = next((t.param.device for t in targets), torch.device("cpu"))
    t0 = time.perf_counter()

    def search_mine() -> dict[str, WeightResult]:
        out = {t.name: solve_target(t, stats, method, amax[t.name], min_expert_tokens, backend, 4) for t in mine_it}
        sync_device(device)
        return out

    own = agree(search_mine, group, what="scale search")
    t1 = time.perf_counter()
    scalars: dict[str, dict] = {}
    for part in _all_gather({n: _scalars(wr) for n, wr in own.items()}, group):
        scalars.update(part)
    result = CalibrationResult(method=method, forward_calls=stats.forward_calls)
    for t, owner in zip(targets, owners, strict=True):
        w = t.weight()
        shape = (*w.shape[:-1], w.shape[-1] // 16)
        if owner == rank:
            wr = own[t.name]
            block_amax = wr.block_amax.contiguous().to(comm)
            codes = wr.block_scale.contiguous().view(torch.uint8).to(comm)
        else:
            block_amax = torch.empty(shape, dtype=torch.float32, device=comm)
            codes = torch.empty(shape, dtype=torch.uint8, device=comm)
        src = _global_rank(group, owner)
        dist.broadcast(block_amax, src=src, group=group)
        dist.broadcast(codes, src=src, group=group)
        if owner == rank:
            result.weights[t.name] = wr
            continue
        sc = scalars[t.name]
        wr = WeightResult.from_dict({
            **sc,
            "global_amax": amax[t.name],
            "block_amax": block_amax.to(w.device),
            "block_scale": codes.to(w.device).view(torch.float8_e4m3fn),
        })  # tensors cloned
        if wr.input_amax is not None:  # where a single process would hold it: on the model's device
            wr.input_amax = wr.input_amax.to(device)
        if wr.codes is not None:
            wr.codes = wr.codes.to(w.device)
        result.weights[t.name] = wr
    sync_device(device)
    return result, {"search": t1 - t0, "gather": time.perf_counter() - t1}


# -- everything -------------------------------------------------------------------------------------------------


def calibrate_distributed(
    model: nn.Module,
    batches: Sequence | Iterable,
    method: str = "local_hessian",
    *,
    exclude: Sequence[str] | str | None = DEFAULT_EXCLUDE,
    include: Sequence[str] | str | None = None,
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
    fake_quantize: bool = False,
    progress: bool = False,
    backend: str | None = None,
    group=None,
    shard_batches: bool = True,
) -> CalibrationResult:
    """calibrate() across the ranks of ``group`` (default: the whole world); every rank must call it.

    Same arguments and result as fp4cal.calibrate, and the same scales, bit for bit, as one process on all
    the batches. Each rank holds the whole model on its own device (torch.cuda.set_device(local_rank) before
    init_process_group for NCCL). batches: with shard_batches=True (default) the SAME sequence on every rank,
    of which rank r forwards batches[r::world]; with shard_batches=False, this rank's own batches (any
    iterable). Every rank returns the full CalibrationResult. result.forward_calls counts the forwards of
    all ranks; timings: capture (this rank's shard), reduce, search (this rank's share), gather, total.
    progress: bars on rank 0 only. Errors on any rank are raised on every rank.
    """
    rank, world = _group_info(group)
    t0 = time.perf_counter()

    def prepare() -> tuple[list[Target], dict[str, str]]:
        with warnings.catch_warnings():
            if rank != 0:  # skipped-weight warnings once, from rank 0
                warnings.simplefilter("ignore")
            return prepare_targets(model, method, min_expert_tokens, exclude, include, stacklevel=4)

    targets, skipped = agree(prepare, group, "finding the weights to calibrate")
    device = model_device(model)
    config = {
        "method": method, "exclude": exclude if isinstance(exclude, (str, type(None))) else list(exclude),
        "include": include if isinstance(include, (str, type(None))) else list(include),
        "min_expert_tokens": min_expert_tokens, "fake_quantize": fake_quantize, "backend": backend,
        "shard_batches": shard_batches,
        "batches": len(batches) if shard_batches and hasattr(batches, "__len__") else None,
    }
    check_same_model(model, targets, config, group)

    def capture() -> CaptureStats:
        mine = shard(batches, rank, world) if shard_batches else batches
        return capture_pass(model, mine, targets, method, progress and rank == 0)

    stats = agree(capture, group, "capture")
    sync_device(device)
    t1 = time.perf_counter()
    reduce_statistics(stats, device, group)
    if stats.forward_calls == 0:  # the reduced count: the same on every rank
        raise ValueError("batches was empty: calibration needs at least one batch")
    sync_device(device)
    t2 = time.perf_counter()
    result, phases = solve_distributed(targets, stats, method, min_expert_tokens, backend, group, progress)
    return finish(result, model, skipped, {"capture": t1 - t0, "reduce": t2 - t1, **phases}, fake_quantize,
                  device, t0)
