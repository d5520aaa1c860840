"""Resize a LoRA/LoCon to another rank (fixed, or per module by sd-scripts' dynamic rules), reporting the energy kept.

Per module the SVD is that of ΔW = up @ down (3x3 convs flattened to [out, in·9] as sd-scripts does),
computed exactly from the factors; up = U·S, down = Vh, and alpha = (old alpha / old rank)·new rank, so the
file's effective ΔW is the best rank-R approximation of the old one. A module is never given more rank than it
has (the extra directions would be zeros). Only plain LoRA/LoCon files are resized: LoHa, LoKr, Tucker, full
diffs and DoRA are refused naming the module (bake them into a checkpoint and extract instead).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import SdtuneError
from ..networks.kohya_file import load_lora
from .lora_common import SAVE_DTYPES, check_output, write_lora
from .lora_delta import LoraModuleParts, LowRank, group_modules
from .lora_svd import DYNAMIC_METHODS, choose_rank, clamp_quantile, svd_of_factors, truncate
from .pipeline import MergeCancelled

__all__ = ["ResizeConfig", "ModuleResize", "ResizeResult", "resize_lora", "resize_module", "plain_lora_modules"]

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ResizeConfig:
    """A LoRA file, the rank(s) to give it, and the output (.safetensors)."""

    lora: str
    output: str
    rank: int
    conv_rank: Optional[int] = None  # 3x3 convs; None: `rank`
    dynamic: Optional[str] = None  # sv_ratio | sv_fro | sv_cumulative (then `rank` is the maximum)
    param: Optional[float] = None
    clamp_quantile: Optional[float] = None  # sd-scripts' resize does not clamp
    dtype: Optional[str] = None  # fp16 | bf16 | fp32; None keeps the input's
    overwrite: bool = False


@dataclass(frozen=True)
class ModuleResize:
    """One module's old and new rank and alpha, and what the truncation keeps."""

    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float


@dataclass
class ResizeResult:
    """What a resize wrote, with the per-module report."""

    output: Path
    modules: list[ModuleResize] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_fro_retained(self) -> float:
        return sum(m.fro_retained for m in self.modules) / max(1, len(self.modules))

    def to_dict(self) -> dict:
        return {"output": str(self.output), "modules": [asdict(m) for m in self.modules],
                "mean_fro_retained": self.mean_fro_retained, "seconds": round(self.seconds, 3)}


def plain_lora_modules(file: str, state: dict[str, torch.Tensor]) -> dict[str, LoraModuleParts]:
    """The modules of a LoRA/LoCon file; any other algorithm is refused naming the module."""
    modules = group_modules(file, state)
    for name, m in modules.items():
        if m.algorithm != "lora" or m.dora:
            what = "DoRA" if m.dora else {"lora_tucker": "Tucker LoCon"}.get(m.algorithm, m.algorithm)
            raise SdtuneError(f"{file}: module {name!r} is {what}; resize and merge work on LoRA/LoCon files only "
                              f"(bake a LyCORIS file into a checkpoint and `lora extract` instead)")
    return modules


def resize_module(lr: LowRank, max_rank: int, dynamic: Optional[str], param: Optional[float],
                  clamp: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, float, ModuleResize]:
    """(up [out, k], down [k, n], new alpha, report) for one module's factors; the name is filled by the caller."""
    u, s, vh = svd_of_factors(lr.up, lr.down)
    full = min(lr.up.shape[0], lr.down.shape[1])
    k = min(choose_rank(s, max_rank, dynamic, param, full_length=full), s.numel())
    tr = truncate(u, s, vh, k)
    up, down = clamp_quantile(tr.up, tr.down, clamp)
    alpha = lr.scale * tr.rank
    return up, down, alpha, ModuleResize("", lr.rank, tr.rank, alpha, tr.sum_retained, tr.fro_retained,
                                         tr.max_ratio)


def _validate(config: ResizeConfig) -> Path:
    if config.rank < 1 or (config.conv_rank is not None and config.conv_rank < 1):
        raise SdtuneError(f"rank: must be at least 1 (rank {config.rank}, conv rank {config.conv_rank})")
    if config.dynamic is not None and config.dynamic not in DYNAMIC_METHODS:
        raise SdtuneError(f"dynamic: {config.dynamic!r}; choose one of {', '.join(DYNAMIC_METHODS)}")
    if config.dynamic is not None and config.param is None:
        raise SdtuneError(f"param: --dynamic {config.dynamic} needs --param (e.g. 0.9 for sv_fro)")
    if config.dtype is not None and config.dtype not in SAVE_DTYPES:
        raise SdtuneError(f"dtype: {config.dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    if not Path(config.lora).is_file():
        raise SdtuneError(f"lora: {config.lora} does not exist (or is not a file)")
    return check_output(config.output, [config.lora], config.overwrite)


def factored_tensors(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float, down_shape: tuple[int, ...],
                     up_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A module's kohya tensors at the new rank, shaped like the old ones (conv kernels kept)."""
    k = down.shape[0]
    return {f"{name}.lora_down.weight": down.reshape(k, *down_shape[1:]).contiguous(),
            f"{name}.lora_up.weight": up.reshape(up_shape[0], k, *up_shape[2:]).contiguous(),
            f"{name}.alpha": torch.tensor(float(alpha), dtype=torch.float32)}


def resize_lora(config: ResizeConfig, progress: Optional[Progress] = None,
                cancelled: Optional[Callable[[], bool]] = None) -> ResizeResult:
    """Resize `config.lora` to `config.rank` (see ResizeConfig), writing `config.output`."""
    started = time.perf_counter()
    output = _validate(config)
    state, metadata = load_lora(config.lora)
    modules = plain_lora_modules(config.lora, state)
    tensors: dict[str, torch.Tensor] = {}
    reports: list[ModuleResize] = []
    old_ranks = set()
    for n, (name, m) in enumerate(modules.items(), 1):
        if cancelled is not None and cancelled():
            raise MergeCancelled("resize cancelled; nothing was written")
        lr = m.low_rank()
        assert lr is not None
        down_shape, up_shape = tuple(m.parts["lora_down.weight"].shape), tuple(m.parts["lora_up.weight"].shape)
        conv3 = len(down_shape) == 4 and down_shape[2:] != (1, 1)
        max_rank = (config.conv_rank or config.rank) if conv3 else config.rank
        up, down, alpha, report = resize_module(lr, max_rank, config.dynamic, config.param, config.clamp_quantile)
        reports.append(replace(report, name=name))
        old_ranks.add(lr.rank)
        tensors.update(factored_tensors(name, up, down, alpha, down_shape, up_shape))
        if progress is not None:
            progress(n, len(modules), name)
    dtype = SAVE_DTYPES[config.dtype] if config.dtype else next(
        (t.dtype for k, t in state.items() if k.endswith("lora_down.weight")), torch.float16)
    meta = dict(metadata)
    alphas = {r.new_alpha for r in reports}
    old = "/".join(str(r) for r in sorted(old_ranks))
    if config.dynamic is None:
        conv = f" (conv: {config.conv_rank})" if config.conv_rank and config.conv_rank != config.rank else ""
        comment = f"dimension is resized from {old} to {config.rank}{conv}"
        meta["ss_network_dim"] = str(config.rank)
        meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    else:
        comment = f"Dynamic resize with {config.dynamic}: {config.param} from {old}"
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
    meta["ss_training_comment"] = f"{comment}; {metadata.get('ss_training_comment', '')}".rstrip("; ")
    write_lora(tensors, output, meta, dtype)
    return ResizeResult(output, reports, time.perf_counter() - started)
