"""Merge methods: small pure functions over float32 tensors, registered by name in one table.

Each function takes the tensors of one key (A, B[, C]), or the same chunk of each, already in float32,
never changes them, and returns a new float32 tensor; the caller casts to the output dtype. What needs
the whole tensor (SLERP's norms, TIES' magnitude cuts) is a separate `stats` function run first, so
every method streams chunk by chunk in bounded memory. Written as the formulas read, so a test
computing the formula with torch gets the same bits (or float32 rounding, where sums are involved).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import SdtuneError

CHUNK = 1 << 15  # entries per step: at or under torch's parallel grain size, and the float32 temporaries in cache


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


def chunks(numel: int) -> range:
    """Start offsets of the CHUNK-sized pieces a tensor of `numel` entries is processed in."""
    return range(0, max(numel, 1), CHUNK)


def top_threshold(x: Tensor, base: Tensor, density: float) -> float:
    """The smallest |x-base| among the `density` fraction of largest ones (0 keeps everything).

    |x-base| is built chunk by chunk into one float32 buffer and the cut found by an in-place
    partial sort, so memory stays at one float32 copy of the tensor.
    """
    n = x.numel()
    k = max(1, math.ceil(density * n)) if n else 0
    if k >= n:
        return 0.0
    mag = torch.empty(n, dtype=torch.float32)
    fx, fb = x.reshape(-1), base.reshape(-1)
    for i in chunks(n):
        torch.sub(fx[i:i + CHUNK].float(), fb[i:i + CHUNK].float(), out=mag[i:i + CHUNK]).abs_()
    values = mag.numpy()
    values.partition(n - k)
    return float(values[n - k])


def keep_top_fraction(delta: Tensor, density: float) -> Tensor:
    """Zero all but the `density` fraction of entries with the largest magnitude (ties at the cut are kept)."""
    threshold = top_threshold(delta, torch.zeros_like(delta), density)
    return torch.where(delta.abs() >= threshold, delta, torch.zeros((), dtype=delta.dtype))


def ties_stats(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float) -> dict[str, float]:
    """TIES' whole-tensor part: the magnitude cut of each delta (top `beta` fraction kept)."""
    return {"cut_a": top_threshold(a, c, beta), "cut_b": top_threshold(b, c, beta)}


def ties(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float, cut_a: float, cut_b: float) -> Tensor:
    """TIES-merging of A and B over base C: trim each delta to its top `beta` fraction (the cuts come from
    ties_stats over the whole tensor), elect the sign of the summed trimmed deltas, average the deltas
    that agree with it, and add alpha times that to C."""
    zero = torch.zeros((), dtype=c.dtype)
    deltas = []
    for x, cut in ((a, cut_a), (b, cut_b)):
        d = x.sub(c)
        deltas.append(torch.where(d.abs() >= cut, d, zero))
    elected = torch.sign(deltas[0].add(deltas[1]))
    total = torch.zeros_like(c)
    count = torch.zeros_like(c)
    for d in deltas:
        agree = (torch.sign(d) == elected) & (d != 0)
        total.add_(torch.where(agree, d, zero))
        count.add_(agree.to(c.dtype))
    merged = total.div_(count.clamp_(min=1.0))
    return c.add(merged.mul_(alpha))


def key_seed(seed: int, key: str) -> int:
    """A per-key seed: the same key gets the same random draw whatever the order keys are merged in."""
    return (seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63)


def dare_mask(numel: int, drop: float, seed: int, key: str, offset: int = 0) -> Tensor:
    """DARE's keep-mask (True = kept, probability 1-drop) for entries offset..offset+numel of a key.

    Each CHUNK of the flattened tensor draws CHUNK uniforms from a generator seeded by (seed, key,
    chunk number), so a chunk can be drawn on its own and the mask is the same however it is split.
    """
    parts = [torch.zeros(0, dtype=torch.bool)]
    pos, end = offset, offset + numel
    while pos < end:
        number = pos // CHUNK
        gen = torch.Generator().manual_seed((key_seed(seed, key) + number) % (2**63))
        block = torch.rand(CHUNK, generator=gen)
        lo, hi = pos - number * CHUNK, min(end - number * CHUNK, CHUNK)
        parts.append(block[lo:hi] >= drop)
        pos = number * CHUNK + hi
    return torch.cat(parts)


def dare(a: Tensor, b: Tensor, c: Tensor, *, alpha: float, beta: float, seed: int, key: str,
         offset: int = 0) -> Tensor:
    """DARE add-difference: A + alpha * (B-C) * mask / (1-beta), dropping each entry of B-C with
    probability beta (seeded per key and chunk, so the result is reproducible) and rescaling the rest."""
    delta = b.sub(c)
    delta.mul_(dare_mask(delta.numel(), beta, seed, key, offset).view(delta.shape))
    delta.div_(1 - beta)
    return a.add(delta.mul_(alpha))


def slerp_stats(a: Tensor, b: Tensor, *, alpha: float) -> dict[str, float]:
    """SLERP's whole-tensor part: the coefficients of A and B, from norms and the dot product summed
    chunk by chunk in float64; parallel, opposite or zero tensors fall back to the weighted sum."""
    aa = bb = ab = 0.0
    fa, fb = a.reshape(-1), b.reshape(-1)
    for i in chunks(fa.numel()):
        x, y = fa[i:i + CHUNK].double(), fb[i:i + CHUNK].double()
        aa, bb, ab = aa + float(x.dot(x)), bb + float(y.dot(y)), ab + float(x.dot(y))
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    if norm_a == 0 or norm_b == 0:
        return {"coef_a": 1 - alpha, "coef_b": alpha}
    omega = math.acos(max(-1.0, min(1.0, ab / (norm_a * norm_b))))
    if math.sin(omega) < 1e-6:
        return {"coef_a": 1 - alpha, "coef_b": alpha}
    norm = (1 - alpha) * norm_a + alpha * norm_b
    return {"coef_a": math.sin((1 - alpha) * omega) / math.sin(omega) * norm / norm_a,
            "coef_b": math.sin(alpha * omega) / math.sin(omega) * norm / norm_b}


def slerp(a: Tensor, b: Tensor, *, alpha: float, coef_a: float, coef_b: float) -> Tensor:
    """Spherical interpolation of each tensor as one vector (direction by slerp, norm by lerp):
    coef_a*A + coef_b*B with the coefficients slerp_stats found for the whole tensor."""
    out = a.mul(coef_a)
    return out.add_(b.mul(coef_b))


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
    # whole-tensor statistics (norms, magnitude cuts) computed first, then passed to `fn`, which works
    # entry by entry, so every method runs chunk by chunk
    stats: Optional[Callable[..., dict[str, float]]] = None

    def _ratios(self, alpha: float, beta: Optional[float]) -> dict:
        return {"alpha": alpha, **({"beta": beta} if self.beta is not None else {})}

    def prepare(self, tensors: list[Tensor], alpha: float, beta: Optional[float]) -> dict[str, float]:
        """The whole-tensor statistics `fn` needs (empty for purely elementwise methods)."""
        return self.stats(*tensors, **self._ratios(alpha, beta)) if self.stats is not None else {}

    def apply(self, tensors: list[Tensor], alpha: float, beta: Optional[float], seed: int, key: str,
              stats: Optional[dict[str, float]] = None, offset: int = 0) -> Tensor:
        """Run the method on float32 tensors (a whole key, or the chunk at `offset` with the key's stats)."""
        kwargs: dict = self._ratios(alpha, beta)
        if self.seeded:
            kwargs.update(seed=seed, key=key, offset=offset)
        if stats is None:
            stats = self.prepare(tensors, alpha, beta)
        return self.fn(*tensors, **kwargs, **stats)


METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("weighted_sum", weighted_sum, 2, "(1-alpha)*A + alpha*B"),
    MergeMethod("add_difference", add_difference, 3, "A + alpha*(B-C)"),
    MergeMethod("triple_sum", triple_sum, 3, "(1-alpha-beta)*A + alpha*B + beta*C",
                BetaSpec("the weight of C", 0.25, -1.0, 2.0)),
    MergeMethod("sum_twice", sum_twice, 3, "(1-beta)*((1-alpha)*A + alpha*B) + beta*C",
                BetaSpec("the weight of C", 0.25, -1.0, 2.0)),
    MergeMethod("train_difference", train_difference, 3,
                "A + 1.8*alpha*(B-C)*|B-A|/(|B-C|+|B-A|) (supermerger)"),
    MergeMethod("ties", ties, 3, "C + alpha*TIES(A-C, B-C; top beta fraction kept, sign election, disjoint mean)",
                BetaSpec("the density (fraction of each delta kept)", 0.2, 0.0001, 1.0), stats=ties_stats),
    MergeMethod("dare", dare, 3, "A + alpha*(B-C)*Bernoulli(1-beta)/(1-beta), seeded per key",
                BetaSpec("the drop rate", 0.9, 0.0, 0.99), seeded=True),
    MergeMethod("slerp", slerp, 2, "slerp(A, B, alpha) per tensor, norms interpolated linearly", stats=slerp_stats),
)}


def get_method(name: str) -> MergeMethod:
    """The registered method `name`, or an error listing the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise SdtuneError(f"method: unknown merge method {name!r}; choose one of {', '.join(METHODS)}") from None
