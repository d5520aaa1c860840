"""Text-encoder override and blend: one checkpoint's TE(s) replaced by, or mixed with, a donor's, streamed.

Every key of the model is written in its own dtype and bits except the chosen text encoder's: on an
override those are the donor's tensors bit for bit (its dtype, `logit_scale` included), on a blend
(1-alpha)*model + alpha*donor in fp32 stored in the model's dtype. `position_ids` (an int64 index
buffer, research/merge_tags.md §2.2) is never mixed: reset to arange or kept from the model.
The merge machinery does the I/O (streamed, hashed inputs, pipelined, atomic output); the merge
methods are not used because `(1-a)*A + a*B` at a=0 or 1 is not bit-exact (-0.0, NaN, dtype casts).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import __version__
from ..errors import SdtuneError
from ..io.detect import ArchInfo, detect_architecture
from ..io.safetensors_io import st_dtype_name
from ..merge.buffers import BufferPool
from ..merge.checkpoint_merge import _RecipeWriter
from ..merge.lora_common import check_output
from ..merge.methods import weighted_sum
from ..merge.pipeline import run_pipeline
from ..merge.recipe import placeholder_hashes
from ..merge.sources import InputHashes, MergeInput, open_input
from .config import TeBlendConfig, TeOverrideConfig, check_number, check_position_ids, check_te_choice

Progress = Callable[[int, int, str], None]
RECIPE_KEY = "sdtune_repair_recipe"
_ENCODER_NAMES = {"text_encoder": "1", "text_encoder_2": "2"}
_LAYER = re.compile(r"(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.")
_SPECIAL = (".position_ids", "logit_scale")  # may be absent on either side without making TEs incompatible
_DROPPED_METADATA = ("sshs_", "modelspec.hash")  # hashes of the source file, wrong for the new one


@dataclass(frozen=True)
class _KeyPlan:
    """What to write for one output key: copy (from model or donor), blend, or reset_ids."""

    name: str
    action: str  # model | donor | blend | reset_ids
    dtype: torch.dtype
    shape: tuple[int, ...]
    alpha: float = 0.0


@dataclass
class TeRepairResult:
    """What a TE override/blend wrote."""

    output: Path
    tool: str
    architecture: str
    encoders: list[str]
    te_tensors: int
    tensors: int
    position_ids: list[str]
    inputs: dict[str, InputHashes]
    seconds: float
    recipe: dict = field(repr=False)

    def to_dict(self) -> dict:
        """JSON-ready summary (`output` first, as the CLI contract asks)."""
        return {"output": str(self.output), "tool": self.tool, "architecture": self.architecture,
                "encoders": self.encoders, "te_tensors": self.te_tensors, "tensors": self.tensors,
                "position_ids": self.position_ids,
                "inputs": {role: asdict(h) for role, h in self.inputs.items()}, "seconds": round(self.seconds, 3)}


def _te_prefixes(info: ArchInfo, te: str, path: str) -> dict[str, str]:
    """component -> key prefix of the text encoders to replace (SDXL: as `te` says)."""
    present = {c: p for c, p in info.components.items() if c.startswith("text_encoder")}
    if not present:
        raise SdtuneError(f"model: {path} has no text encoder ({info.architecture}, U-Net-only?); nothing to repair")
    if te != "both":
        if info.family != "sdxl":
            raise SdtuneError(f"te: --te {te} picks one of SDXL's two text encoders, but {path} is "
                              f"{info.architecture} with one; leave --te out")
        name = "text_encoder" if te == "1" else "text_encoder_2"
        if name not in present:
            raise SdtuneError(f"te: {path} has no text encoder {te}")
        present = {name: present[name]}
    return present


def _te_layout(keys: dict[str, tuple], prefix: str) -> dict[str, tuple]:
    """The keys under `prefix` (name without prefix -> (dtype, shape)), ids and logit_scale left out."""
    return {k[len(prefix):]: v[1] for k, v in keys.items() if k.startswith(prefix) and not k.endswith(_SPECIAL)}


def _check_compatible(model: MergeInput, donor: MergeInput, m_info: ArchInfo, d_info: ArchInfo,
                      prefixes: dict[str, str], labels: tuple[str, str]) -> None:
    """Refuse a donor whose text encoder(s) are not the same architecture as the model's, naming both files."""
    m_label, d_label = labels
    if m_info.family != d_info.family:
        raise SdtuneError(f"donor {d_label} is {d_info.architecture} but model {m_label} is {m_info.architecture}; "
                          f"their text encoders differ, so the donor must be {m_info.family} too")
    for comp, prefix in prefixes.items():
        if comp not in d_info.components:
            raise SdtuneError(f"donor {d_label} ({d_info.architecture}) has no {comp} (model {m_label} has one)")
        m_keys, d_keys = _te_layout(model.tensors, prefix), _te_layout(donor.tensors, prefix)
        only_m, only_d = sorted(set(m_keys) - set(d_keys)), sorted(set(d_keys) - set(m_keys))
        shapes = [k for k in m_keys if k in d_keys and tuple(m_keys[k]) != tuple(d_keys[k])]
        if only_m or only_d or shapes:
            what = (f"{len(only_m)} keys only in the model (e.g. {only_m[:2]})" if only_m else
                    f"{len(only_d)} keys only in the donor (e.g. {only_d[:2]})" if only_d else
                    f"{len(shapes)} shapes differ (e.g. {shapes[0]}: {list(m_keys[shapes[0]])} vs "
                    f"{list(d_keys[shapes[0]])})")
            raise SdtuneError(f"the {comp} of donor {d_label} ({d_info.architecture}, {len(d_keys)} keys) is not "
                              f"the same architecture as that of model {m_label} ({m_info.architecture}, "
                              f"{len(m_keys)} keys): {what}. Pick a donor made from the same base model family "
                              f"(e.g. a WD-style SD2 TE lacks the last layer)")


def _layer_alphas(layers: Sequence[Sequence[float]], model_keys: dict[str, tuple], prefixes: dict[str, str]
                  ) -> dict[str, list[float]]:
    """prefix -> per-layer alphas: each list goes to the encoder with that many layers."""
    counts = {}
    for prefix in prefixes.values():
        ids = {int(m.group(1)) for k in model_keys if k.startswith(prefix) and (m := _LAYER.search(k[len(prefix):]))}
        counts[prefix] = len(ids)
    out: dict[str, list[float]] = {}
    for values in layers:
        match = [p for p, n in counts.items() if n == len(values) and p not in out]
        if not match:
            raise SdtuneError(f"layers: {len(values)} values given, but the text encoder(s) have "
                              f"{', '.join(str(n) for n in counts.values())} layers; give one value per layer")
        out[match[0]] = [check_number(f"layers[{i}]", v, -1.0, 2.0) for i, v in enumerate(values)]
    return out


def _plan(model: MergeInput, donor: MergeInput, prefixes: dict[str, str], mode: str, alpha: float,
          layer_alphas: dict[str, list[float]], position_ids: str) -> list[_KeyPlan]:
    """Every output key, in the model's order."""
    plans = []
    for name, (dtype, shape) in model.tensors.items():
        prefix = next((p for p in prefixes.values() if name.startswith(p)), None)
        if dtype is None:
            raise SdtuneError(f"model: tensor {name!r} has a dtype this torch cannot hold")
        if prefix is None:
            plans.append(_KeyPlan(name, "model", dtype, shape))
        elif name.endswith(".position_ids"):
            plans.append(_KeyPlan(name, "reset_ids", torch.int64, shape) if position_ids == "reset"
                         else _KeyPlan(name, "model", dtype, shape))
        elif name.endswith("logit_scale"):  # unused by SD; the donor's on override when it has one
            d = donor.tensors.get(name)
            plans.append(_KeyPlan(name, "donor", d[0], d[1]) if mode == "override" and d and d[0] is not None
                         else _KeyPlan(name, "model", dtype, shape))
        elif mode == "override":
            d_dtype = donor.tensors[name][0]
            if d_dtype is None:
                raise SdtuneError(f"donor: tensor {name!r} has a dtype this torch cannot hold")
            plans.append(_KeyPlan(name, "donor", d_dtype, shape))
        elif not dtype.is_floating_point:
            plans.append(_KeyPlan(name, "model", dtype, shape))
        else:
            a = alpha
            m = _LAYER.search(name[len(prefix):])
            if m and prefix in layer_alphas:
                a = layer_alphas[prefix][int(m.group(1))]
            plans.append(_KeyPlan(name, "blend", dtype, shape, a))
    return plans


def _file_entry(path: str, h: InputHashes) -> dict:
    p = Path(path).resolve()
    return {"path": str(p), "name": p.name, "sha256": h.sha256, "autov1": h.autov1, "size": h.size}


def _metadata(model_meta: dict[str, str], recipe: dict) -> dict[str, str]:
    """The model's metadata (less its own file hashes) plus the repair recipe."""
    meta = {k: v for k, v in model_meta.items() if not k.startswith(_DROPPED_METADATA) and k != RECIPE_KEY}
    meta.setdefault("format", "pt")
    meta[RECIPE_KEY] = json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return meta


def _compute(plan: _KeyPlan, fetched: list[tuple[torch.Tensor, Optional[bytearray]]], pool: BufferPool
             ) -> tuple[torch.Tensor, Optional[bytearray]]:
    if plan.action == "reset_ids":
        return torch.arange(plan.shape[-1], dtype=torch.int64).expand(plan.shape).contiguous(), None
    if plan.action in ("model", "donor"):
        return fetched[0][0], None
    a, b = fetched[0][0], fetched[1][0]
    out, buf = pool.empty(plan.shape, plan.dtype)
    return out.copy_(weighted_sum(a.float(), b.float(), alpha=plan.alpha)), buf  # never in place: a, b may be hashed


def _repair(tool: str, model_path: str, donor_path: str, output: str, te: str, position_ids: str,
            overwrite: bool, alpha: float, layers: Sequence[Sequence[float]], params: dict,
            progress: Optional[Progress], cancelled: Optional[Callable[[], bool]]) -> TeRepairResult:
    """Check both headers, plan every key, stream them through the merge pipeline into an atomic writer."""
    started = time.perf_counter()
    check_te_choice(te)
    check_position_ids(position_ids)
    out = check_output(output, [model_path, donor_path], overwrite)
    inputs: list[MergeInput] = []
    try:
        model = open_input(model_path, "model")
        inputs.append(model)
        donor = open_input(donor_path, "donor")
        inputs.append(donor)
        labels = (str(model_path), str(donor_path))
        m_info = detect_architecture({k: s for k, (_, s) in model.tensors.items()}, what=f"model ({model_path})")
        d_info = detect_architecture({k: s for k, (_, s) in donor.tensors.items()}, what=f"donor ({donor_path})")
        prefixes = _te_prefixes(m_info, te, str(model_path))
        _check_compatible(model, donor, m_info, d_info, prefixes, labels)
        mode = "override" if tool == "te-override" else "blend"
        plans = _plan(model, donor, prefixes, mode, alpha, _layer_alphas(layers, model.tensors, prefixes),
                      position_ids)
        sources = {"model": [0], "donor": [1], "blend": [0, 1], "reset_ids": []}
        for i, inp in enumerate(inputs):
            inp.check_order([p.name for p in plans if i in sources[p.action]])
        specs = {p.name: (st_dtype_name(p.dtype), p.shape) for p in plans}
        encoders = [_ENCODER_NAMES[c] for c in prefixes] if m_info.family == "sdxl" else ["1"]

        def recipe_of(hashes: Sequence[InputHashes]) -> dict:
            return {"type": "sdtune-repair", "version": 1, "sdtune": __version__, "tool": tool,
                    "architecture": m_info.architecture, "model": _file_entry(model_path, hashes[0]),
                    "donor": _file_entry(donor_path, hashes[1]), "encoders": encoders,
                    "position_ids": position_ids, **params}

        reserved = _metadata(model.metadata, recipe_of(placeholder_hashes(2, [model.size, donor.size])))
        pool = BufferPool()
        total = len(plans)

        def fetch(plan: _KeyPlan) -> list:
            return [inputs[i].get(plan.name, pool) for i in sources[plan.action]]

        def recycle(plan: _KeyPlan, fetched: list, computed: tuple) -> None:
            pool.release([b for _, b in fetched] + [computed[1]])

        def on_done(n: int, plan: _KeyPlan) -> None:
            if progress is not None:
                progress(n, total, plan.name)

        with _RecipeWriter(out, specs, reserved) as writer:
            run_pipeline(plans, fetch, lambda p, f: _compute(p, f, pool), lambda p, c: writer.write(p.name, c[0]),
                         cancelled=cancelled, on_done=on_done, after_write=recycle)
            hashes = [inp.finish() for inp in inputs]
            recipe = recipe_of(hashes)
            writer.rewrite_metadata(_metadata(model.metadata, recipe))
        te_count = sum(1 for p in plans if p.action in ("donor", "blend", "reset_ids")
                       or any(p.name.startswith(x) for x in prefixes.values()))
        ids = [p.name for p in plans if p.name.endswith(".position_ids")]
        return TeRepairResult(out, tool, m_info.architecture, encoders, te_count, total, ids,
                              {"model": hashes[0], "donor": hashes[1]}, time.perf_counter() - started, recipe)
    finally:
        for inp in inputs:
            inp.close()


def override_te(config: TeOverrideConfig, progress: Optional[Progress] = None,
                cancelled: Optional[Callable[[], bool]] = None) -> TeRepairResult:
    """Write `config.model` with `config.donor`'s text encoder(s), bit for bit; see TeOverrideConfig."""
    return _repair("te-override", config.model, config.donor, config.output, config.te, config.position_ids,
                   config.overwrite, 1.0, (), {"te": config.te}, progress, cancelled)


def blend_te(config: TeBlendConfig, progress: Optional[Progress] = None,
             cancelled: Optional[Callable[[], bool]] = None) -> TeRepairResult:
    """Write `config.model` with TE = (1-alpha)*model.TE + alpha*donor.TE; see TeBlendConfig."""
    alpha = check_number("alpha", config.alpha, -1.0, 2.0)
    params = {"te": config.te, "alpha": alpha, "formula": "(1-alpha)*model + alpha*donor",
              "layers": [[float(v) for v in layer] for layer in config.layers]}
    return _repair("te-blend", config.model, config.donor, config.output, config.te, config.position_ids,
                   config.overwrite, alpha, config.layers, params, progress, cancelled)
