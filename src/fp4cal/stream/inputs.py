"""What each decoder layer is called with, for every calibration batch, and where those activations live.

One forward of the model per batch with every decoder layer's ``forward`` replaced by a recorder: the
recorder keeps the hidden states given to layer 0 and, for each layer, the other arguments the model passes
it (attention mask, which may differ per layer type, position embeddings, position ids, cache position...),
then hands the hidden states on unchanged; the last one stops the forward. So the layers later see exactly
what the model's own forward would have given them, with no knowledge of the architecture.

Tensors shared by several layers (one position-embedding tuple, one mask per layer type) are stored once.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fp4cal.calib.capture import run_batch
from fp4cal.stream.reader import pinned_copy


class _StopForward(Exception):
    """Raised by the last layer's recorder: nothing after the decoder layers is needed."""


def _hidden_and_rest(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    if "hidden_states" not in kwargs:
        raise ValueError("a decoder layer was called without hidden states (no positional argument and no "
                         "'hidden_states' keyword); streaming cannot follow this model")
    return kwargs.pop("hidden_states"), (), kwargs


def pack(obj, store, memo: dict[int, object]):
    """``obj`` with every tensor replaced by store(tensor) (tuples, lists and dicts followed; one stored copy
    per distinct tensor object, by identity through ``memo``)."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, store(obj))  # keep obj alive so its id is not reused
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(pack(v, store, memo) for v in obj)
    if isinstance(obj, list):
        return [pack(v, store, memo) for v in obj]
    if isinstance(obj, dict):
        return {k: pack(v, store, memo) for k, v in obj.items()}
    return obj


def unpack(obj, device: torch.device, memo: dict[int, object]):
    """Inverse of pack for a compute device: tensors not on ``device`` are copied there (once each)."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, obj.to(device, non_blocking=True))
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(unpack(v, device, memo) for v in obj)
    if isinstance(obj, list):
        return [unpack(v, device, memo) for v in obj]
    if isinstance(obj, dict):
        return {k: unpack(v, device, memo) for k, v in obj.items()}
    return obj


class ActivationStore:
    """Where captured activations live: the compute device, or (pinned, when the device is CUDA) CPU memory.

    Pinned: copies to the host run on their own CUDA stream after the kernels that made the tensor, copies to
    the device on another stream, so both overlap the compute stream's kernels (a Qwen3-8B layer's batch of
    16k tokens moves 2 x 128 MiB while it computes ~10 ms). ``fetch`` starts a copy to the device, ``use``
    makes the compute stream wait for it; ``get`` does both. Host-side readers and the next pass call
    ``sync`` first (the outputs' copies to the host must be complete)."""

    def __init__(self, device: torch.device, on_device: bool):
        self.device = device
        self.on_device = on_device
        pinned = device.type == "cuda" and not on_device
        self._down = torch.cuda.Stream(device) if pinned else None  # device -> pinned host
        self._up = torch.cuda.Stream(device) if pinned else None  # pinned host -> device

    def put(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.on_device:
            return t if t.device == self.device else t.to(self.device)
        if t.device.type == "cpu":
            return t
        self._down.wait_stream(torch.cuda.current_stream(self.device))  # after the kernels that wrote t
        return pinned_copy(t, self._down)

    def fetch(self, t: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Start copying a stored tensor to the device; returns (tensor, event) for ``use``."""
        if t.device == self.device:
            return t, None
        if self._up is None:
            return t.to(self.device, non_blocking=True), None
        with torch.cuda.stream(self._up):
            d = t.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._up)
        return d, ev

    def use(self, fetched: tuple[torch.Tensor, object]) -> torch.Tensor:
        """The fetched tensor, with the compute stream ordered after its copy."""
        d, ev = fetched
        if ev is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ev)
            d.record_stream(compute)  # allocated on the copy stream, freed after the compute stream used it
        return d

    def get(self, t: torch.Tensor) -> torch.Tensor:
        return self.use(self.fetch(t))

    def sync(self) -> None:
        """Wait for device -> pinned copies (before a pinned buffer is read on the host or by the next pass)."""
        if self._down is not None:
            self._down.synchronize()


class LayerInputs:
    """hidden[b]: layer 0's hidden states for batch b (in the store); calls[i][b]: (args, kwargs) that layer i
    gets for batch b besides the hidden states (tensors in the store, shared ones stored once)."""

    def __init__(self, n_layers: int):
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list[tuple[tuple, dict]]] = [[] for _ in range(n_layers)]


def forward_extras(model: nn.Module) -> dict[str, object]:
    """use_cache=False where the model takes it: a key/value cache is not needed and would grow per layer."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: Sequence,
    device: torch.device,
    store: ActivationStore,
    extra_kwargs: Mapping[str, object] | None = None,
) -> LayerInputs:
    """Run every batch through ``model`` (whose modules before the layers must hold real weights) with each
    decoder layer replaced by a recorder; returns what each layer is called with."""
    n = len(layers)
    out = LayerInputs(n)
    state: dict = {}

    def recorder(i: int):
        def forward(mod, *args, **kwargs):
            hidden, rest_args, rest_kwargs = _hidden_and_rest(args, kwargs)
            if i == 0:
                out.hidden.append(store.put(hidden))
            memo = state["memo"]
            out.calls[i].append((pack(rest_args, store.put, memo), pack(rest_kwargs, store.put, memo)))
            if i == n - 1:
                raise _StopForward
            return hidden

        return forward

    saved = []
    for i, layer in enumerate(layers):
        saved.append((layer, layer.__dict__.get("forward")))
        layer.forward = types.MethodType(recorder(i), layer)
    try:
        with torch.no_grad():
            for batch in batches:
                state["memo"] = {}
                try:
                    run_batch(model, batch, device, extra_kwargs)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError(f"{type(model).__name__}'s forward returned without calling its last decoder "
                                       "layer; streaming cannot follow this model")
    finally:
        for layer, fwd in saved:
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd
        store.sync()
    if len(out.hidden) != len(batches) or any(len(c) != len(batches) for c in out.calls):
        raise RuntimeError("not every decoder layer was called once per batch; streaming cannot follow this model")
    return out


def replay_outputs(model: nn.Module, layers: nn.ModuleList, outputs: list[torch.Tensor], store: ActivationStore,
                   batches: Sequence, device: torch.device, extra_kwargs: Mapping[str, object] | None = None) -> None:
    """Run every batch through ``model`` with each decoder layer returning the stored output of the last layer
    for that batch: the modules after the layers (final norm, pooler, head) see what the whole model's
    forward would give them. Used to capture statistics of weights outside the layers."""
    pos = {"b": 0}

    def forward(mod, *args, **kwargs):
        return store.get(outputs[pos["b"]])

    saved = []
    for layer in layers:
        saved.append((layer, layer.__dict__.get("forward")))
        layer.forward = types.MethodType(forward, layer)
    try:
        with torch.no_grad():
            for b, batch in enumerate(batches):
                pos["b"] = b
                run_batch(model, batch, device, extra_kwargs)
    finally:
        for layer, fwd in saved:
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd
