"""Merge LoRA/LoCon files into one: exact concatenation along the rank, or SVD of the sum to a new rank.

Both start from the same exact sum ΔW = Σ ratio_i·(alpha_i/rank_i)·up_i@down_i. Concatenation writes it as is:
each file's scale and ratio are folded into its up rows, ranks add up, alpha = rank (scale 1), so files of
different ranks and alphas merge exactly (sd-scripts' element-wise sum is exact only for one file). With a
rank, the sum is factored by SVD (from the concatenated factors, so no dense ΔW is formed) and truncated by
the same fixed or dynamic rules as `resize`, alpha = new rank, as sd-scripts' svd_merge_lora writes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import SdtuneError
from ..networks.kohya_file import load_lora
from ..networks.lora_info import inspect_lora, lora_family
from .lora_common import SAVE_DTYPES, check_output, minimal_metadata, write_lora
from .lora_delta import LowRank
from .lora_resize import ModuleResize, factored_tensors, plain_lora_modules, resize_module
from .lora_svd import DYNAMIC_METHODS
from .pipeline import MergeCancelled

__all__ = ["LoraMergeConfig", "LoraMergeResult", "merge_loras"]

Progress = Callable[[int, int, str], None]
MERGED_KEY = "sdtune_merged_loras"


@dataclass(frozen=True)
class LoraMergeConfig:
    """LoRA files with their ratios, the output, and a rank for SVD (None: exact concatenation)."""

    loras: tuple[tuple[str, float], ...]  # (path, ratio)
    output: str
    rank: Optional[int] = None
    conv_rank: Optional[int] = None  # 3x3 convs with SVD; None: `rank`
    dynamic: Optional[str] = None  # sv_ratio | sv_fro | sv_cumulative (with `rank` as the maximum)
    param: Optional[float] = None
    clamp_quantile: Optional[float] = None  # sd-scripts' svd_merge_lora clamps at 0.99; off by default here
    dtype: Optional[str] = None  # fp16 | bf16 | fp32; None: the first file's
    overwrite: bool = False


@dataclass
class LoraMergeResult:
    """What a LoRA merge wrote."""

    output: Path
    mode: str  # concat | svd
    modules: int
    ranks: dict[str, int]
    report: list[ModuleResize] = field(default_factory=list)  # SVD only
    seconds: float = 0.0

    def to_dict(self) -> dict:
        ranks = sorted(set(self.ranks.values()))
        return {"output": str(self.output), "mode": self.mode, "modules": self.modules,
                "rank": ranks[0] if len(ranks) == 1 else self.ranks,
                "mean_fro_retained": (sum(r.fro_retained for r in self.report) / len(self.report)
                                      if self.report else None), "seconds": round(self.seconds, 3)}


def _validate(config: LoraMergeConfig) -> Path:
    if not config.loras:
        raise SdtuneError("loras: give at least one LoRA file")
    for path, ratio in config.loras:
        if not Path(path).is_file():
            raise SdtuneError(f"loras: {path} does not exist (or is not a file)")
        if not math.isfinite(ratio):
            raise SdtuneError(f"loras: the ratio of {path} must be a finite number, got {ratio}")
    if config.rank is None and (config.dynamic or config.conv_rank):
        raise SdtuneError("rank: --dynamic and --conv-rank need --rank (the SVD merge); without it files are "
                          "concatenated exactly")
    if config.rank is not None and config.rank < 1:
        raise SdtuneError(f"rank: must be at least 1, got {config.rank}")
    if config.dynamic is not None and (config.dynamic not in DYNAMIC_METHODS or config.param is None):
        raise SdtuneError(f"dynamic: choose one of {', '.join(DYNAMIC_METHODS)} and give --param")
    if config.dtype is not None and config.dtype not in SAVE_DTYPES:
        raise SdtuneError(f"dtype: {config.dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    return check_output(config.output, [p for p, _ in config.loras], config.overwrite)


def _base_version(paths: list[str]) -> str:
    """The files' common ss_base_model_version; files for different architectures are refused naming both."""
    versions = [(p, inspect_lora(p).base_model_version) for p in paths]
    first_path, first = versions[0]
    for path, version in versions[1:]:
        if lora_family(version) != lora_family(first) and None not in (lora_family(version), lora_family(first)):
            raise SdtuneError(f"{path} is a LoRA for {version} but {first_path} is for {first}; only LoRAs of "
                              f"the same architecture can be merged")
    return next((v for _, v in versions if lora_family(v) is not None), first)


def merge_loras(config: LoraMergeConfig, progress: Optional[Progress] = None,
                cancelled: Optional[Callable[[], bool]] = None) -> LoraMergeResult:
    """Merge `config.loras` (concatenation, or SVD with `config.rank`), writing `config.output`."""
    started = time.perf_counter()
    output = _validate(config)
    base_version = _base_version([p for p, _ in config.loras])
    # module -> [(factors with ratio and scale folded into up, down shape, up shape, file)]
    parts: dict[str, list[tuple[LowRank, tuple, tuple, str]]] = {}
    dtype: Optional[torch.dtype] = SAVE_DTYPES[config.dtype] if config.dtype else None
    for path, ratio in config.loras:
        state, _ = load_lora(path)
        for name, m in plain_lora_modules(path, state).items():
            lr = m.low_rank()
            assert lr is not None
            down, up = m.parts["lora_down.weight"], m.parts["lora_up.weight"]
            dtype = dtype or down.dtype
            folded = LowRank(lr.up * (ratio * lr.scale), lr.down, 1.0)
            parts.setdefault(name, []).append((folded, tuple(down.shape), tuple(up.shape), path))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    report: list[ModuleResize] = []
    conv_used = False
    for n, (name, items) in enumerate(parts.items(), 1):
        if cancelled is not None and cancelled():
            raise MergeCancelled("LoRA merge cancelled; nothing was written")
        _, down_shape, up_shape, first_path = items[0]
        for _lr, d_shape, u_shape, path in items[1:]:
            if d_shape[1:] != down_shape[1:] or u_shape[0] != up_shape[0]:
                raise SdtuneError(f"module {name!r}: {path} has lora_down {list(d_shape)} / lora_up {list(u_shape)}, "
                                  f"{first_path} {list(down_shape)} / {list(up_shape)}; the LoRAs are for "
                                  f"different models")
        cat = LowRank(torch.cat([lr.up for lr, *_ in items], 1), torch.cat([lr.down for lr, *_ in items], 0), 1.0)
        conv3 = len(down_shape) == 4 and down_shape[2:] != (1, 1)
        conv_used |= conv3
        if config.rank is None:
            up, down, alpha = cat.up, cat.down, float(cat.rank)
        else:
            max_rank = (config.conv_rank or config.rank) if conv3 else config.rank
            up, down, alpha, r = resize_module(cat, max_rank, config.dynamic, config.param, config.clamp_quantile)
            report.append(replace(r, name=name))
        ranks[name] = int(down.shape[0])
        tensors.update(factored_tensors(name, up, down, alpha, down_shape, up_shape))
        if progress is not None:
            progress(n, len(parts), name)
    distinct = sorted(set(ranks.values()))
    dim: object = distinct[0] if len(distinct) == 1 and config.dynamic is None else "Dynamic"
    args = None
    if conv_used and config.rank is not None and config.dynamic is None:
        conv = config.conv_rank or config.rank
        args = {"conv_dim": conv, "conv_alpha": conv}
    mode = "concat" if config.rank is None else "svd"
    meta = minimal_metadata(base_version, dim, dim, output, args,
                            comment=f"merged by sdtune ({mode}) from " + ", ".join(Path(p).name for p, _ in
                                                                                   config.loras))
    meta[MERGED_KEY] = json.dumps([{"name": Path(p).name, "ratio": r} for p, r in config.loras],
                                  separators=(",", ":"))
    write_lora(tensors, output, meta, dtype)
    return LoraMergeResult(output, mode, len(parts), ranks, report, time.perf_counter() - started)
