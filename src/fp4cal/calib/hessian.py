"""Input Hessians: per-block H_j = sum_t x_tj x_tj^T / n (16x16 per 16 input channels) and, for GPTQ, the full
[cin, cin] one, whose diagonal blocks are the former."""

from __future__ import annotations

import torch

from fp4cal.validation import BLOCK, FLOAT_DTYPES, check_finite


def check_activations(x: torch.Tensor, cin: int, device: torch.device, name: str) -> None:
    """What both accumulators' add() take: a float tensor (..., cin) on the accumulator's device."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES + (torch.float64,):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"activations of {name} must be a float tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] != cin:
        raise ValueError(f"activations of {name} must have last dimension cin = {cin}, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"activations of {name} are on {x.device}, the accumulator is on {device}")


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x over the tokens as fp32: x [T, n] -> [n, n] (the full Hessian) or x [nb, T, 16] -> [nb, 16, 16] (the
    block Hessians, x a strided view of [T, cin]). On CUDA, bf16/fp16 activations go straight into a tensor-core
    matmul with fp32 output (mm / bmm out_dtype; products of 8/11-bit mantissas are exact in fp32, sums in fp32):
    no fp32 copy of the activations, which for a [16384, 12288] input is 0.8 GB written and read again per batch,
    and for the full [12288, 12288] Hessian ~10-30x faster than the fp32 product. Elsewhere (and for fp32
    input): the fp32 product."""
    mm = torch.mm if x.dim() == 2 else torch.bmm
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return mm(x.transpose(-1, -2), x, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without out_dtype=: the fp32 product below
            pass
    xf = x.float()
    return mm(xf.transpose(-1, -2), xf)


class HessianAccumulator:
    """Accumulates sum x x^T per 16-channel block, and the token count.

    ``add(x)`` takes activations (..., cin) of any float dtype; every leading index is one token.
    ``sum`` is fp32 [cin/16, 16, 16]; ``normalized()`` returns sum / n in fp32 (what the search takes).

    Each ``add`` forms its batch's products in fp32 (one bmm), and the running sum across batches is kept in
    float64 (``sum64``). Why: a sum over batches then depends on the order of the additions only through
    float64 rounding, which the final fp32 rounding of ``normalized()`` hides (see docs/distributed.md), so a
    data-parallel run that adds per-rank partial sums gives the same fp32 Hessian as one process adding the
    batches one after the other.
    """

    def __init__(self, cin: int, device: torch.device | str | None = None, name: str = "x") -> None:
        if not isinstance(cin, int) or isinstance(cin, bool) or cin <= 0 or cin % BLOCK:
            raise ValueError(f"cin of {name} must be a positive multiple of {BLOCK}, got {cin}")
        self.cin = cin
        self.name = name
        self._sum = torch.zeros(cin // BLOCK, BLOCK, BLOCK, dtype=torch.float64, device=device)
        self.n = 0

    @property
    def sum(self) -> torch.Tensor:
        """sum x x^T per block, fp32 [cin/16, 16, 16] (a rounded copy of the float64 accumulator)."""
        return self._sum.float()

    @sum.setter
    def sum(self, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(self._sum.shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"sum of {self.name} must be a tensor of shape {tuple(self._sum.shape)}, got {got}")
        self._sum = value.detach().to(device=self._sum.device, dtype=torch.float64).clone()

    @property
    def sum64(self) -> torch.Tensor:
        """The float64 accumulator itself, [cin/16, 16, 16] (not a copy: in-place reductions write into it)."""
        return self._sum

    def add(self, x: torch.Tensor, check: bool = True) -> None:
        """Add activations x: (..., cin), float; non-finite values raise. check=False skips that test (a host
        sync per call): for callers that check the same activations another way (the capture checks each input's
        amax once at the end, and a non-finite activation makes its amax non-finite)."""
        check_activations(x, self.cin, self._sum.device, self.name)
        if x.numel() == 0:
            return
        xb = x.reshape(-1, self.cin // BLOCK, BLOCK)
        if check:
            check_finite(xb, f"activations of {self.name}")
        # [nb, T, 16]^T @ [nb, T, 16] -> [nb, 16, 16]: this batch's products in fp32 (the matmul's own
        # accumulation, a fixed function of the batch), added to the float64 running sum.
        self._sum += _gram(xb.transpose(0, 1))
        self.n += xb.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's sums (e.g. from another data shard)."""
        if not isinstance(other, HessianAccumulator):
            raise TypeError(f"can only merge a HessianAccumulator into {self.name}, got {type(other).__name__}")
        if other._sum.shape != self._sum.shape:
            raise ValueError(f"cannot merge Hessians of shape {tuple(other._sum.shape)} into {tuple(self._sum.shape)}")
        self._sum += other._sum.to(self._sum.device)
        self.n += other.n

    def normalized(self) -> torch.Tensor:
        """H / n, fp32 [cin/16, 16, 16]. Raises when no token was seen."""
        if self.n == 0:
            raise ValueError(f"no tokens were accumulated for {self.name}; cannot normalize an empty Hessian")
        return (self._sum / self.n).float()


class FullHessianAccumulator:
    """Accumulates the full input second moment sum x x^T ([cin, cin]) and the token count, for GPTQ.

    Same arithmetic as HessianAccumulator: each ``add`` forms its batch's products in fp32 (one matmul), the
    running sum is float64. ``blocks()`` returns a HessianAccumulator holding the 16x16 diagonal blocks of this
    sum (float64, unrounded), so one capture serves the block-scale search and GPTQ.
    Memory: 8 * cin^2 bytes (134 MB for cin = 4096).
    """

    def __init__(self, cin: int, device: torch.device | str | None = None, name: str = "x") -> None:
        if not isinstance(cin, int) or isinstance(cin, bool) or cin <= 0 or cin % BLOCK:
            raise ValueError(f"cin of {name} must be a positive multiple of {BLOCK}, got {cin}")
        self.cin = cin
        self.name = name
        self._sum = torch.zeros(cin, cin, dtype=torch.float64, device=device)
        self.n = 0

    @property
    def sum64(self) -> torch.Tensor:
        """The float64 accumulator itself, [cin, cin] (not a copy)."""
        return self._sum

    def add(self, x: torch.Tensor, check: bool = True) -> None:
        """Add activations x: (..., cin), float; non-finite values raise, naming the input (check=False: the
        caller checks them another way, as HessianAccumulator.add)."""
        check_activations(x, self.cin, self._sum.device, self.name)
        x2 = x.reshape(-1, self.cin)
        if x2.shape[0] == 0:
            return
        if check:
            check_finite(x2, f"activations of {self.name}")
        self._sum += _gram(x2)  # this batch in fp32, added to the float64 running sum
        self.n += x2.shape[0]

    def merge(self, other: FullHessianAccumulator) -> None:
        """Add another accumulator's sums (e.g. from another data shard)."""
        if not isinstance(other, FullHessianAccumulator) or other._sum.shape != self._sum.shape:
            got = tuple(other._sum.shape) if isinstance(other, FullHessianAccumulator) else type(other).__name__
            raise ValueError(f"cannot merge {got} into the full Hessian of {self.name} {tuple(self._sum.shape)}")
        self._sum += other._sum.to(self._sum.device)
        self.n += other.n

    def normalized(self) -> torch.Tensor:
        """H = sum / n, float64 [cin, cin]. Raises when no token was seen."""
        if self.n == 0:
            raise ValueError(f"no tokens were accumulated for {self.name}; cannot normalize an empty Hessian")
        return self._sum / self.n

    def blocks(self) -> HessianAccumulator:
        """A HessianAccumulator with this sum's 16x16 diagonal blocks and token count."""
        nb = self.cin // BLOCK
        acc = HessianAccumulator(self.cin, self._sum.device, self.name)
        acc.sum64.copy_(self._sum.reshape(nb, BLOCK, nb, BLOCK).diagonal(dim1=0, dim2=2).permute(2, 0, 1))
        acc.n = self.n
        return acc
