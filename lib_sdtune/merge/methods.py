"""Merge methods: small pure functions over float32 tensors, registered by name in one table.

Each function takes the tensors of one key (A, B[, C]) already in float32, never changes them, and
returns a new float32 tensor; the caller casts to the output dtype. Written as the formulas read,
so a test computing the formula with torch gets the same bits.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import SdtuneError


def weighted_sum(a: Tensor, b: Tensor, *, alpha: float) -> Tensor:
    """(1-alpha)*A + alpha*B, as A1111's checkpoint merger (alpha 0 keeps A)."""
    out = a.mul(1 - alpha)
    return out.add_(b.mul(alpha))


def add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    """A + alpha*(B-C), as A1111: adds what B learned on top of C to A."""
    out = b.sub(c)
    out.mul_(alpha)
    return out.add_(a)


def triple_sum(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float) -> Tensor:
    """(1-alpha-beta)*A + alpha*B + beta*C (supermerger's "triple sum")."""
    out = a.mul(1 - alpha - beta)
    out.add_(b.mul(alpha))
    return out.add_(c.mul(beta))


def sum_twice(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float) -> Tensor:
    """(1-beta)*((1-alpha)*A + alpha*B) + beta*C (supermerger's "sum twice")."""
    out = weighted_sum(a, b, alpha=alpha)
    out.mul_(1 - beta)
    return out.add_(c.mul(beta))


def train_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    """supermerger's trainDifference: A + 1.8*alpha*(B-C) scaled per weight by |B-A| / (|B-C| + |B-A|).

    Where A already moved as far as B did from C, little is added; where A sits at C, the full
    difference is. The 1.8 factor is supermerger's.
    """
    diff = b.sub(c)
    dist_bc = diff.abs()
    dist_ba = b.sub(a).abs_()
    total = dist_bc.add(dist_ba)
    scale = torch.where(total != 0, dist_ba.div(total), torch.zeros((), dtype=a.dtype))
    new_diff = torch.sign(diff).mul_(scale.abs_()).mul_(dist_bc)
    return a.add(new_diff.mul_(alpha * 1.8))


def keep_top_fraction(delta: Tensor, density: float) -> Tensor:
    """Zero all but the `density` fraction of entries with the largest magnitude (ties at the cut are kept)."""
    n = delta.numel()
    k = max(1, math.ceil(density * n)) if n else 0
    if k >= n:
        return delta.clone()
    mag = delta.abs().reshape(-1)
    threshold = torch.kthvalue(mag, n - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros((), dtype=delta.dtype))


def ties(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float) -> Tensor:
    """TIES-merging of A and B over base C: trim each delta to its top `beta` fraction, elect the sign
    of the summed trimmed deltas, average the deltas that agree with it, and add alpha times that to C."""
    deltas = [keep_top_fraction(a.sub(c), beta), keep_top_fraction(b.sub(c), beta)]
    elected = torch.sign(deltas[0].add(deltas[1]))
    total = torch.zeros_like(c)
    count = torch.zeros_like(c)
    for d in deltas:
        agree = (torch.sign(d) == elected) & (d != 0)
        total.add_(torch.where(agree, d, torch.zeros((), dtype=d.dtype)))
        count.add_(agree.to(c.dtype))
    merged = total.div_(count.clamp_(min=1.0))
    return c.add(merged.mul_(alpha))


def key_seed(seed: int, key: str) -> int:
    """A per-key seed: the same key gets the same random draw whatever the order keys are merged in."""
    return (seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63)


def dare_mask(shape: torch.Size, drop: float, seed: int, key: str) -> Tensor:
    """DARE's keep-mask (True = kept, probability 1-drop), drawn from a generator seeded by (seed, key)."""
    gen = torch.Generator().manual_seed(key_seed(seed, key))
    return torch.rand(shape, generator=gen, dtype=torch.float32) >= drop


def dare(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float, seed: int, key: str) -> Tensor:
    """DARE add-difference: A + alpha * (B-C) * mask / (1-beta), dropping each entry of B-C with
    probability beta (seeded per key, so the result is reproducible) and rescaling the survivors."""
    delta = b.sub(c)
    delta.mul_(dare_mask(delta.shape, beta, seed, key))
    delta.div_(1 - beta)
    return a.add(delta.mul_(alpha))


def slerp(a: Tensor, b: Tensor, *, alpha: float) -> Tensor:
    """Spherical interpolation of each tensor as one vector (direction by slerp, norm by lerp);
    parallel, opposite or zero tensors fall back to the weighted sum."""
    norm_a, norm_b = a.norm(), b.norm()
    if norm_a == 0 or norm_b == 0:
        return weighted_sum(a, b, alpha=alpha)
    unit_a, unit_b = a.div(norm_a), b.div(norm_b)
    dot = unit_a.mul(unit_b).sum().clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    if float(sin_omega) < 1e-6:
        return weighted_sum(a, b, alpha=alpha)
    out = unit_a.mul_(torch.sin((1 - alpha) * omega)).add_(unit_b.mul_(torch.sin(alpha * omega)))
    out.div_(sin_omega)
    return out.mul_((1 - alpha) * norm_a + alpha * norm_b)


@dataclass(frozen=True)
class BetaSpec:
    """What a method's second ratio means, its default and its allowed range."""

    meaning: str
    default: float
    low: float = 0.0
    high: float = 1.0


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, how many models it takes, and its beta if any."""

    name: str
    fn: Callable[..., Tensor]
    models: int
    formula: str
    beta: Optional[BetaSpec] = None
    seeded: bool = False
    elementwise: bool = False  # each output entry depends only on the same entry of the inputs (can be chunked)

    def apply(self, tensors: list[Tensor], alpha: float, beta: Optional[float], seed: int, key: str) -> Tensor:
        """Run the method on one key's float32 tensors."""
        kwargs: dict = {"alpha": alpha}
        if self.beta is not None:
            kwargs["beta"] = beta
        if self.seeded:
            kwargs.update(seed=seed, key=key)
        return self.fn(*tensors, **kwargs)


METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("weighted_sum", weighted_sum, 2, "(1-alpha)*A + alpha*B", elementwise=True),
    MergeMethod("add_difference", add_difference, 3, "A + alpha*(B-C)", elementwise=True),
    MergeMethod("triple_sum", triple_sum, 3, "(1-alpha-beta)*A + alpha*B + beta*C",
                BetaSpec("the weight of C", 0.25, -1.0, 2.0), elementwise=True),
    MergeMethod("sum_twice", sum_twice, 3, "(1-beta)*((1-alpha)*A + alpha*B) + beta*C",
                BetaSpec("the weight of C", 0.25, -1.0, 2.0), elementwise=True),
    MergeMethod("train_difference", train_difference, 3,
                "A + 1.8*alpha*(B-C)*|B-A|/(|B-C|+|B-A|) (supermerger)", elementwise=True),
    MergeMethod("ties", ties, 3, "C + alpha*TIES(A-C, B-C; top beta fraction kept, sign election, disjoint mean)",
                BetaSpec("the density (fraction of each delta kept)", 0.2, 0.0001, 1.0)),
    MergeMethod("dare", dare, 3, "A + alpha*(B-C)*Bernoulli(1-beta)/(1-beta), seeded per key",
                BetaSpec("the drop rate", 0.9, 0.0, 0.99), seeded=True),
    MergeMethod("slerp", slerp, 2, "slerp(A, B, alpha) per tensor, norms interpolated linearly"),
)}


def get_method(name: str) -> MergeMethod:
    """The registered method `name`, or an error listing the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise SdtuneError(f"method: unknown merge method {name!r}; choose one of {', '.join(METHODS)}") from None
