"""Extract a LoRA from a tuned checkpoint and its base: per layer sd-scripts would wrap, the SVD of W_tuned - W_base.

As sd-scripts' extract_lora_from_models.py: linear layers (and 1x1 convs) get `rank`, 3x3 convs `conv_rank`
(and only with it are ResNet/sampling layers extracted), up = U·S, down = Vh, both clamped to the
`clamp_quantile` quantile of their values, alpha = rank; the text encoders are kept only if some weight
differs by more than `min_diff`. Tensors are read one at a time from both files (fused OpenCLIP q/k/v by
rows); the SVD is exact (torch.linalg.svd) or randomized (torch.svd_lowrank, much faster at low rank).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import SdtuneError
from ..io.checkpoint import open_checkpoint
from ..io.detect import detect_architecture
from ..models.hints import resolve_hints
from ..networks.naming import LoraTarget
from .lora_common import (
    SAVE_DTYPES,
    base_model_version,
    check_output,
    checkpoint_name_map,
    minimal_metadata,
    target_shape,
    write_lora,
)
from .lora_resize import factored_tensors
from .lora_svd import SVD_METHODS, clamp_quantile, svd_dense, truncate
from .pipeline import MergeCancelled

__all__ = ["ExtractConfig", "ExtractResult", "extract_lora", "extract_module"]

log = logging.getLogger(__name__)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ExtractConfig:
    """Two checkpoints of one architecture, the ranks, and sd-scripts' clamp and text-encoder threshold."""

    base: str
    tuned: str
    output: str
    rank: int = 4  # linear layers and 1x1 convs (sd-scripts' --dim)
    conv_rank: Optional[int] = None  # 3x3 convs; None extracts no ResNet/sampling layers (LoRA-LierLa)
    clamp_quantile: Optional[float] = 0.99  # None or 1: no clamp
    min_diff: float = 0.01  # text encoders are kept only if some |W_tuned - W_base| exceeds this
    svd: str = "exact"  # exact | randomized
    niter: int = 2  # power iterations of the randomized SVD
    device: str = "cpu"  # where the SVDs run (cuda is much faster for large ranks)
    threads: Optional[int] = None  # torch CPU threads for the SVDs (None: torch's default); 1 on a busy machine
    dtype: str = "fp16"
    overwrite: bool = False


@dataclass
class ExtractResult:
    """What an extraction wrote."""

    output: Path
    architecture: str
    te_kept: bool
    te_max_diff: float
    te_modules: int
    unet_modules: int
    mean_fro_retained: float  # ‖ΔW_rank‖ / ‖ΔW‖ averaged over modules with a non-zero ΔW
    seconds: float

    def to_dict(self) -> dict:
        return {"output": str(self.output), "architecture": self.architecture, "te_kept": self.te_kept,
                "te_max_diff": self.te_max_diff, "te_modules": self.te_modules, "unet_modules": self.unet_modules,
                "mean_fro_retained": self.mean_fro_retained, "seconds": round(self.seconds, 3)}


def _validate(config: ExtractConfig) -> Path:
    if config.rank < 1 or (config.conv_rank is not None and config.conv_rank < 1):
        raise SdtuneError(f"rank: must be at least 1 (rank {config.rank}, conv rank {config.conv_rank})")
    if config.svd not in SVD_METHODS:
        raise SdtuneError(f"svd: {config.svd!r}; choose one of {', '.join(SVD_METHODS)}")
    if config.dtype not in SAVE_DTYPES:
        raise SdtuneError(f"dtype: {config.dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    if not math.isfinite(config.min_diff) or config.min_diff < 0:
        raise SdtuneError(f"min_diff: must be a non-negative number, got {config.min_diff}")
    for role in ("base", "tuned"):
        if not Path(getattr(config, role)).is_file():
            raise SdtuneError(f"{role}: {getattr(config, role)} does not exist (or is not a file)")
    return check_output(config.output, [config.base, config.tuned], config.overwrite)


def extract_module(diff: torch.Tensor, rank: int, method: str = "exact", clamp: Optional[float] = 0.99,
                   niter: int = 2) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up [out, k], down [k, n], Frobenius share kept) of one ΔW matrix [out, n], k = min(rank, out, n)."""
    k = min(rank, *diff.shape)
    u, s, vh = svd_dense(diff, method, k, niter=niter)
    tr = truncate(u, s, vh, k)
    up, down = clamp_quantile(tr.up, tr.down, clamp)
    norm = float(diff.float().norm())
    kept = float(s[:tr.rank].pow(2).sum().sqrt()) / norm if norm > 0 else 1.0
    return up, down, kept


def _rows(t: LoraTarget, w: torch.Tensor) -> torch.Tensor:
    return w if t.original_rows is None else w[t.original_rows[0]:t.original_rows[1]]


def extract_lora(config: ExtractConfig, progress: Optional[Progress] = None,
                 cancelled: Optional[Callable[[], bool]] = None) -> ExtractResult:
    """Extract `config.tuned - config.base` as a kohya LoRA in `config.output`; see ExtractConfig."""
    before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(max(1, config.threads))
    try:
        return _extract(config, progress, cancelled)
    finally:
        torch.set_num_threads(before)


def _extract(config: ExtractConfig, progress: Optional[Progress], cancelled: Optional[Callable[[], bool]]
             ) -> ExtractResult:
    started = time.perf_counter()
    output = _validate(config)
    base, tuned = open_checkpoint(config.base), open_checkpoint(config.tuned)
    arch = detect_architecture(base.shapes(), f"base ({config.base})")
    other = detect_architecture(tuned.shapes(), f"tuned ({config.tuned})")
    if other.family != arch.family:
        raise SdtuneError(f"tuned ({config.tuned}) is {other.architecture} but base ({config.base}) is "
                          f"{arch.architecture}; a LoRA is extracted from two checkpoints of the same architecture")
    names = checkpoint_name_map(base.shapes(), arch, config.base, conv=config.conv_rank is not None)
    by_key: dict[str, list[LoraTarget]] = {}
    for t in names.values():
        by_key.setdefault(t.original_key, []).append(t)
    for key in by_key:
        if key not in tuned or tuned.shape(key) != base.shape(key):
            have = list(tuned.shape(key)) if key in tuned else "nothing"
            raise SdtuneError(f"tuned ({config.tuned}) has {have} for {key}, base {list(base.shape(key))}; "
                              f"the two files are not the same model layout")
    te_keys = [k for k, ts in by_key.items() if ts[0].component != "unet"]
    unet_keys = [k for k, ts in by_key.items() if ts[0].component == "unet"]
    tensors: dict[str, torch.Tensor] = {}
    kept: list[float] = []
    total = len(names)
    done = [0]

    def run(key: str, svd: bool) -> float:
        """Diff one checkpoint tensor; with `svd`, factor each of its targets. Returns max |diff|."""
        if cancelled is not None and cancelled():
            raise MergeCancelled("extract cancelled; nothing was written")
        wb, wt = base[key].float(), tuned[key].float()
        biggest = 0.0
        for t in by_key[key]:
            diff = _rows(t, wt) - _rows(t, wb)
            biggest = max(biggest, float(diff.abs().max()) if diff.numel() else 0.0)
            if svd:
                _factor(t, diff.reshape(diff.shape[0], -1))
        return biggest

    def _factor(t: LoraTarget, diff: torch.Tensor) -> None:
        rank = config.conv_rank if t.uses_conv_dim and config.conv_rank else config.rank
        up, down, share = extract_module(diff.to(config.device), rank, config.svd, config.clamp_quantile,
                                         config.niter)
        if float(diff.norm()) > 0:
            kept.append(share)
        k = down.shape[0]
        shape = target_shape(t)
        up_shape = (shape[0], k, 1, 1) if t.layer_type == "Conv2d" else (shape[0], k)
        tensors.update(factored_tensors(t.name, up.cpu(), down.cpu(), float(k), (k, *shape[1:]), up_shape))
        done[0] += 1
        if progress is not None:
            progress(done[0], total, t.name)

    te_max, te_kept, pending = 0.0, False, []
    for key in te_keys:
        if te_kept:
            run(key, True)
            continue
        te_max = max(te_max, run(key, False))
        pending.append(key)
        if te_max > config.min_diff:
            te_kept = True
            log.info("text encoder differs (max |diff| %.4g > %g): extracted too", te_max, config.min_diff)
            for k in pending:
                run(k, True)
    if te_keys and not te_kept:
        log.warning("text encoder is the same (max |diff| %.4g <= %g): U-Net only", te_max, config.min_diff)
    for key in unet_keys:
        run(key, True)
    v_pred = "v_prediction" in (arch.prediction_type, resolve_hints(arch.family, config.base).prediction_type)
    args = {"conv_dim": config.conv_rank, "conv_alpha": float(config.conv_rank)} if config.conv_rank else None
    meta = minimal_metadata(base_model_version(arch.family, v_pred), config.rank, float(config.rank), output, args,
                            comment=f"extracted by sdtune ({config.svd} SVD) from {Path(config.tuned).name} "
                                    f"- {Path(config.base).name}")
    write_lora(tensors, output, meta, SAVE_DTYPES[config.dtype])
    te_n = sum(1 for n in tensors if n.startswith("lora_te") and n.endswith(".alpha"))
    return ExtractResult(output, arch.architecture, te_kept, te_max, te_n,
                         sum(1 for n in tensors if n.startswith("lora_unet") and n.endswith(".alpha")),
                         sum(kept) / len(kept) if kept else 1.0, time.perf_counter() - started)
