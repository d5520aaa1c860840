"""Low-rank factoring for the LoRA tools: SVD of a ΔW (exact, randomized, or of low-rank factors), sd-scripts'
rank rules (fixed, sv_ratio, sv_fro, sv_cumulative), its quantile clamp, and the energy a truncation keeps.

The rank rules are sd-scripts' `resize_lora.py` arithmetic as written, including its one-past index:
sv_ratio counts singular values above S_max/param, sv_cumulative and sv_fro find the first index whose
cumulative share reaches param (sv_fro on squares, against param²); that index is clamped to
[1, len(S)-1] and one is added; an all-zero ΔW gets rank 1, and no rule goes past the asked maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import SdtuneError

__all__ = ["DYNAMIC_METHODS", "SVD_METHODS", "Truncation", "svd_of_factors", "svd_dense", "choose_rank",
           "truncate", "clamp_quantile", "quantile"]

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
SVD_METHODS = ("exact", "randomized")
MIN_SV = 1e-6  # sd-scripts: a largest singular value at or below this is an all-zero ΔW


@dataclass(frozen=True)
class Truncation:
    """A ΔW's rank-k factors (`up` = U·S [out, k], `down` = Vh [k, in*kh*kw]) and the energy they keep."""

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    sum_retained: float  # Σ S[:k] / Σ S
    fro_retained: float  # ‖S[:k]‖ / ‖S‖ (Frobenius norm of the ΔW kept)
    max_ratio: float  # S[0] / S[k-1]


def svd_of_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of up @ down ([out, r] @ [r, n]) through QR of the factors: exact, cost O((out+n)·r²)."""
    qu, ru = torch.linalg.qr(up.float())
    qd, rd = torch.linalg.qr(down.float().T)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ u, s, vh @ qd.T


def svd_dense(matrix: torch.Tensor, method: str = "exact", rank: Optional[int] = None, oversample: int = 8,
              niter: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a matrix: exact (torch.linalg.svd), or randomized (torch.svd_lowrank) for the top `rank`."""
    m = matrix.float()
    if method == "exact":
        return torch.linalg.svd(m, full_matrices=False)
    if method != "randomized":
        raise SdtuneError(f"svd: {method!r}; choose one of {', '.join(SVD_METHODS)}")
    if rank is None:
        raise SdtuneError("svd: the randomized SVD needs the rank it should find")
    q = min(rank + oversample, *m.shape)
    u, s, v = torch.svd_lowrank(m, q=q, niter=niter)
    return u, s, v.T


def choose_rank(s: torch.Tensor, max_rank: int, dynamic: Optional[str] = None, param: Optional[float] = None,
                full_length: Optional[int] = None) -> int:
    """The rank sd-scripts' resize keeps for singular values `s` (descending); see the module docstring.

    `full_length` pads `s` with zeros to the ΔW's full spectrum (min(out, in)) when `s` holds only the
    non-zero part, so the rules see what sd-scripts' full SVD sees.
    """
    s = s.float()
    if full_length is not None and full_length > s.numel():
        s = torch.cat([s, s.new_zeros(full_length - s.numel())])
    if dynamic is None:
        new = max_rank
    else:
        if param is None or not math.isfinite(param) or param <= 0:
            raise SdtuneError(f"param: {dynamic} needs a positive number, got {param}")
        if dynamic == "sv_ratio":
            index = int(torch.sum(s > s[0] / param).item())
        elif dynamic == "sv_cumulative":
            shares = torch.cumsum(s, 0) / float(torch.sum(s))
            index = int(torch.searchsorted(shares, torch.tensor([float(param)]))[0]) + 1
        elif dynamic == "sv_fro":
            sq = s.pow(2)
            shares = torch.cumsum(sq, 0) / float(torch.sum(sq))
            index = int(torch.searchsorted(shares, torch.tensor([float(param) ** 2]))[0]) + 1
        else:
            raise SdtuneError(f"dynamic: {dynamic!r}; choose one of {', '.join(DYNAMIC_METHODS)}")
        new = max(1, min(index, s.numel() - 1)) + 1
    if float(s[0]) <= MIN_SV:
        return 1
    return max(1, min(new, max_rank))


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Truncation:
    """Keep the first `rank` singular triplets: up = U·S, down = Vh (as sd-scripts writes them)."""
    k = max(1, min(rank, s.numel()))
    total, fro = float(s.sum()), float(s.pow(2).sum().sqrt())
    kept = s[:k]
    sum_ret = float(kept.sum()) / total if total > 0 else 1.0
    fro_ret = float(kept.pow(2).sum().sqrt()) / fro if fro > 0 else 1.0
    max_ratio = float(s[0] / s[k - 1]) if float(s[k - 1]) > 0 else math.inf
    return Truncation(u[:, :k] * kept, vh[:k].clone(), k, sum_ret, fro_ret, max_ratio)


def quantile(values: torch.Tensor, q: float) -> float:
    """torch.quantile's linear interpolation through kthvalue, without its 2^24-element limit."""
    flat = values.flatten().float()
    pos = q * (flat.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a = float(torch.kthvalue(flat, lo + 1).values)
    b = a if hi == lo else float(torch.kthvalue(flat, hi + 1).values)
    return a + (b - a) * (pos - lo)


def clamp_quantile(up: torch.Tensor, down: torch.Tensor, q: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """sd-scripts' clamp: both factors to ±(the q-quantile of their values together); None or q >= 1: no clamp."""
    if q is None or q >= 1:
        return up, down
    if not 0 < q < 1:
        raise SdtuneError(f"clamp_quantile: {q} must be between 0 and 1 (sd-scripts uses 0.99; 1 turns it off)")
    hi = quantile(torch.cat([up.flatten(), down.flatten()]), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)
