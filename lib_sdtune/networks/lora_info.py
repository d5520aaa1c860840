"""What a LoRA/LyCORIS file is (ours or anyone's), read from its header alone: `lora info`.

The algorithm comes from the tensor suffixes (LyCORIS's own key names), ranks from the tensor shapes,
the base model from `ss_base_model_version` or, for files without metadata, from the module names
and widths (as A1111 and ComfyUI must guess too).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

from ..errors import SdtuneError
from ..io.hashes import safetensors_data_hash
from ..io.safetensors_io import SafetensorsFile

# tensor suffix -> algorithm, most specific first (names as sd-scripts and LyCORIS write them)
_ALGO_SUFFIXES = [("hada_w1_a", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"), ("diff", "full"),
                  ("on_input", "ia3"), ("lora_mid.weight", "locon"), ("lora_down.weight", "lora")]
# where each algorithm's rank is: (tensor suffix, axis), first present wins; full-matrix LoKr has none
_RANK_AT = {"lora": [("lora_down.weight", 0)], "locon": [("lora_down.weight", 0)], "loha": [("hada_w1_b", 0)],
            "lokr": [("lokr_w2_a", 1), ("lokr_w1_a", 1)]}


@dataclass
class LoraInfo:
    """The answer of `lora info`; field names are the CLI's JSON contract."""

    file: str
    algorithm: str  # lora | locon | loha | lokr | full | ia3 | mixed (...)
    rank: Union[int, dict[str, int], None]
    alpha: Union[float, dict[str, float], None]
    base_model_version: str
    te_modules: int
    unet_modules: int
    dtype: str
    dora: bool
    output_name: str
    tags: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _modules(sf: SafetensorsFile) -> dict[str, dict[str, tuple[int, ...]]]:
    """module name -> {tensor suffix: shape}."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, info in sf.tensors.items():
        module, _, suffix = key.partition(".")
        out.setdefault(module, {})[suffix] = info.shape
    return out


def _algorithm(parts: dict[str, tuple[int, ...]]) -> str:
    for suffix, algo in _ALGO_SUFFIXES:
        if suffix in parts:
            if algo == "lora" and len(parts["lora_down.weight"]) == 4 and parts["lora_down.weight"][2:] != (1, 1):
                return "locon"
            return algo
    return "unknown"


def _collapse(values: dict[str, float]):
    """One value when every module has the same, else the per-module mapping."""
    distinct = set(values.values())
    return next(iter(distinct)) if len(distinct) == 1 else (values or None)


def _guess_base(modules: dict[str, dict[str, tuple[int, ...]]]) -> str:
    """sd_v1 / sd_v2 / sdxl_base_v1-0 from module names and text-encoder width (no metadata)."""
    names = list(modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names) or any("input_blocks_7_1" in n for n in names):
        return "sdxl_base_v1-0"
    for name, parts in modules.items():
        if name.startswith("lora_te_") and name.endswith("q_proj") and "lora_down.weight" in parts:
            return "sd_v2" if parts["lora_down.weight"][1] == 1024 else "sd_v1"
        if name.endswith("attn2_to_k") and "lora_down.weight" in parts:
            width = parts["lora_down.weight"][1]
            return {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}.get(width, "unknown")
    return "unknown"


def _tags(metadata: dict[str, str]) -> dict[str, int]:
    """Trained tag frequencies from `ss_tag_frequency` ({dataset dir: {tag: count}}), summed over dirs."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return {}
    try:
        per_dir = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    total: Counter = Counter()
    for tags in per_dir.values() if isinstance(per_dir, dict) else []:
        if isinstance(tags, dict):
            total.update({str(t): int(n) for t, n in tags.items() if isinstance(n, (int, float))})
    return dict(total.most_common())


def inspect_lora(path: str | os.PathLike) -> LoraInfo:
    """Summarise a LoRA/LyCORIS safetensors file without loading its tensors."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise SdtuneError(f"{p}: sdtune reads LoRA files only as .safetensors (pickles are never opened)")
    sf = SafetensorsFile(p)
    modules = _modules(sf)
    algos = {name: _algorithm(parts) for name, parts in modules.items()}
    if not modules or all(a == "unknown" for a in algos.values()):
        raise SdtuneError(f"{p}: no LoRA or LyCORIS modules found (is this a checkpoint? try `model info`)")
    kinds = Counter(algos.values())
    algorithm = kinds.most_common(1)[0][0] if len(kinds) == 1 else \
        "mixed (" + ", ".join(f"{a} {n}" for a, n in kinds.most_common()) + ")"
    if set(kinds) == {"lora", "locon"}:
        algorithm = "locon"  # LoCon = LoRA on the attention layers plus the 3x3 convs
    ranks = {}
    for n, parts in modules.items():
        at = next(((suffix, axis) for suffix, axis in _RANK_AT.get(algos[n], []) if suffix in parts), None)
        if at is not None:
            ranks[n] = int(parts[at[0]][at[1]])
    alphas = {n: float(sf.get_tensor(n + ".alpha").float()) for n, parts in modules.items() if "alpha" in parts}
    dtypes = Counter(i.dtype for k, i in sf.tensors.items() if not k.endswith(".alpha"))
    meta = sf.metadata
    hashes = {"sshs_model_hash": safetensors_data_hash(p)}
    if "sshs_model_hash" in meta:
        hashes["stored_sshs_model_hash"] = meta["sshs_model_hash"]
    return LoraInfo(
        file=str(p), algorithm=algorithm, rank=_collapse(ranks), alpha=_collapse(alphas),
        base_model_version=meta.get("ss_base_model_version") or _guess_base(modules),
        te_modules=sum(1 for n in modules if n.startswith("lora_te")),
        unet_modules=sum(1 for n in modules if n.startswith("lora_unet")),
        dtype={"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(dtypes.most_common(1)[0][0], "mixed"),
        dora=any("dora_scale" in parts for parts in modules.values()),
        output_name=meta.get("ss_output_name") or p.stem, tags=_tags(meta), hashes=hashes,
        metadata={k: v for k, v in meta.items() if k != "ss_tag_frequency"},
    )


def format_lora_info(info: LoraInfo) -> str:
    """The human-readable report of `lora info`."""
    rank = info.rank if not isinstance(info.rank, dict) else f"per module ({min(info.rank.values())}-" \
                                                             f"{max(info.rank.values())})"
    alpha = info.alpha if not isinstance(info.alpha, dict) else "per module"
    lines = [f"file:        {info.file}",
             f"algorithm:   {info.algorithm}{' + DoRA' if info.dora else ''}, rank {rank}, alpha {alpha}, {info.dtype}",
             f"base model:  {info.base_model_version}",
             f"modules:     text encoder {info.te_modules}, U-Net {info.unet_modules}",
             f"name:        {info.output_name}   sshs_model_hash {info.hashes['sshs_model_hash'][:12]}"]
    if info.tags:
        top = ", ".join(f"{t} ({n})" for t, n in list(info.tags.items())[:15])
        lines.append(f"tags:        {top}{', ...' if len(info.tags) > 15 else ''}")
    return "\n".join(lines)


_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "the SDXL refiner"}


def lora_family(base_model_version: str) -> str | None:
    """The model family a `ss_base_model_version` value stands for (sd1, sd2, sdxl), or None if unknown."""
    v = base_model_version.lower()
    if v.startswith("sdxl"):
        return "sdxl"
    if v.startswith("sd_v2") or v.startswith("sd2"):
        return "sd2"
    if v.startswith("sd_v1") or v.startswith("sd1"):
        return "sd1"
    return None


def check_lora_fits(info: LoraInfo, family: str) -> None:
    """Refuse a LoRA made for another architecture, naming the one it is for (SD1 LoRA on SDXL, ...)."""
    made_for = lora_family(info.base_model_version)
    target = "sdxl" if family == "sdxl-refiner" else family
    if made_for is not None and made_for != target:
        raise SdtuneError(f"{info.file}: this LoRA was made for {_FAMILY_NAMES[made_for]} "
                          f"(ss_base_model_version {info.base_model_version}), but the model is "
                          f"{_FAMILY_NAMES[family]}; use it with an {_FAMILY_NAMES[made_for]} model")
