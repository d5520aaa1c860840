"""The merge recipe stored in the output's metadata, and re-running it bit for bit.

`sdtune_merge_recipe` (JSON) holds everything that decides the output bytes: inputs (absolute
path, sha256, A1111 legacy hash, size), method, ratios, block weights, seed, dtype, VAE, pruning,
position_ids mode and the sdtune version. Beside it, A1111's readable `sd_merge_recipe` and
`sd_merge_models` (hash -> name, legacy hash, nested recipe) so hosts and Civitai show the lineage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .. import __version__
from ..errors import SdtuneError
from ..io.safetensors_io import read_header
from .config import MergeConfig
from .methods import get_method
from .sources import InputHashes

RECIPE_KEY = "sdtune_merge_recipe"
RECIPE_TYPE = "sdtune-merge"
RECIPE_VERSION = 1
ROLES = "ABC"


def _json(obj: object) -> str:
    """Deterministic compact JSON (the same recipe always gives the same bytes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def placeholder_hashes(n: int, size: Sequence[int]) -> list[InputHashes]:
    """Stand-ins of the final hashes' exact length, used while the inputs are still being read."""
    return [InputHashes(f"{i:064x}", f"{i:08x}", size[i]) for i in range(n)]


def _blocks_entry(blocks: object) -> Optional[object]:
    if blocks is None or isinstance(blocks, str):
        return blocks
    return [float(v) for v in blocks]  # type: ignore[union-attr]


def _float(value: Optional[float]) -> Optional[float]:
    """Ratios recorded as floats, so 1 and 1.0 give the same recipe bytes."""
    return None if value is None else float(value)


def _file_entry(role: str, path: str, h: InputHashes) -> dict:
    p = Path(path).resolve()
    return {"role": role, "path": str(p), "name": p.name, "sha256": h.sha256, "autov1": h.autov1, "size": h.size}


def build_recipe(config: MergeConfig, architecture: str, hashes: Sequence[InputHashes],
                 vae_hash: Optional[InputHashes]) -> dict:
    """The recipe of a merge: every setting that decides the output bytes, with the inputs' hashes."""
    method = get_method(config.method)
    return {
        "type": RECIPE_TYPE, "version": RECIPE_VERSION, "sdtune": __version__, "architecture": architecture,
        "method": config.method, "formula": method.formula,
        "inputs": [_file_entry(r, p, h) for r, p, h in zip(ROLES, config.inputs, hashes)],
        "alpha": _float(config.alpha), "beta": _float(config.effective_beta), "unet_alpha": _float(config.unet_alpha),
        "te_alpha": _float(config.te_alpha), "vae_alpha": _float(config.vae_alpha),
        "blocks": _blocks_entry(config.blocks), "blocks_beta": _blocks_entry(config.blocks_beta),
        "seed": config.seed, "dtype": config.dtype,
        "vae": _file_entry("VAE", config.vae, vae_hash) if config.vae and vae_hash else None,
        "prune_ema": config.prune_ema, "prune_schedule": config.prune_schedule, "position_ids": config.position_ids,
    }


def recipe_metadata(recipe: dict, input_metadata: Sequence[Mapping[str, str]], variant: str) -> dict[str, str]:
    """The output's `__metadata__`: our recipe plus A1111's readable `sd_merge_recipe` / `sd_merge_models`."""
    inputs = recipe["inputs"]
    hashes = [i["sha256"] for i in inputs] + [None] * (3 - len(inputs))
    pruned = [p for p, on in ((r"^model_ema\.", recipe["prune_ema"]), ("schedule buffers", recipe["prune_schedule"]))
              if on]
    a1111 = {
        "type": "sdtune", "primary_model_hash": hashes[0], "secondary_model_hash": hashes[1],
        "tertiary_model_hash": hashes[2], "interp_method": recipe["method"], "multiplier": recipe["alpha"],
        "beta": recipe["beta"], "block_weights": recipe["blocks"], "save_as_half": recipe["dtype"] == "fp16",
        "dtype": recipe["dtype"], "bake_in_vae": recipe["vae"]["name"] if recipe["vae"] else "None",
        "discard_weights": ", ".join(pruned), "is_inpainting": variant == "inpaint",
        "is_instruct_pix2pix": variant == "instruct-pix2pix",
    }
    models: dict[str, object] = {}
    for entry, meta in zip(inputs, input_metadata):
        nested = meta.get("sd_merge_recipe")
        models[entry["sha256"]] = {"name": Path(entry["name"]).stem, "legacy_hash": entry["autov1"],
                                   "sd_merge_recipe": _parse(nested)}
        parents = _parse(meta.get("sd_merge_models"))
        if isinstance(parents, dict):
            models.update(parents)
    return {"format": "pt", RECIPE_KEY: _json(recipe), "sd_merge_recipe": _json(a1111),
            "sd_merge_models": _json(models)}


def _parse(text: Optional[str]) -> object:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def load_recipe(path: str | os.PathLike) -> dict:
    """Read a recipe from a merged .safetensors file's metadata or from a .json file."""
    p = Path(path)
    if not p.is_file():
        raise SdtuneError(f"recipe: {p} does not exist")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SdtuneError(f"recipe: {p} is not readable JSON ({e})") from e
        if isinstance(data, dict) and RECIPE_KEY in data:
            data = _parse(data[RECIPE_KEY]) if isinstance(data[RECIPE_KEY], str) else data[RECIPE_KEY]
    else:
        _, metadata, _ = read_header(p)
        if RECIPE_KEY not in metadata:
            other = " It has an A1111/supermerger sd_merge_recipe, which records hashes but not the files; " \
                    "merge its inputs again with `merge A B ...`." if "sd_merge_recipe" in metadata else ""
            raise SdtuneError(f"recipe: {p} has no {RECIPE_KEY} metadata, so it was not merged by sdtune.{other}")
        data = _parse(metadata[RECIPE_KEY])
    if not isinstance(data, dict) or data.get("type") != RECIPE_TYPE:
        raise SdtuneError(f"recipe: {p} does not hold an sdtune merge recipe")
    if data.get("version") != RECIPE_VERSION:
        raise SdtuneError(f"recipe: {p} has recipe version {data.get('version')}; this sdtune reads version "
                          f"{RECIPE_VERSION}. Use the sdtune version named in the recipe ({data.get('sdtune')}).")
    return data


def _hashes(entry: Mapping) -> InputHashes:
    return InputHashes(str(entry["sha256"]), str(entry["autov1"]), int(entry["size"]))


def config_from_recipe(recipe: Mapping, output: str | os.PathLike, in_memory: bool = False) -> MergeConfig:
    """The MergeConfig that re-runs `recipe` into `output`, with the recorded input hashes to verify."""
    try:
        inputs = tuple(str(i["path"]) for i in recipe["inputs"])
        blocks = recipe["blocks"]
        blocks_beta = recipe["blocks_beta"]
        vae = recipe["vae"]
        return MergeConfig(
            inputs=inputs, output=str(output), method=str(recipe["method"]), alpha=float(recipe["alpha"]),
            beta=None if recipe["beta"] is None else float(recipe["beta"]),
            unet_alpha=recipe["unet_alpha"], te_alpha=recipe["te_alpha"], vae_alpha=recipe["vae_alpha"],
            blocks=tuple(blocks) if isinstance(blocks, list) else blocks,
            blocks_beta=tuple(blocks_beta) if isinstance(blocks_beta, list) else blocks_beta,
            seed=int(recipe["seed"]), dtype=str(recipe["dtype"]), vae=str(vae["path"]) if vae else None,
            prune_ema=bool(recipe["prune_ema"]), prune_schedule=bool(recipe["prune_schedule"]),
            position_ids=str(recipe["position_ids"]), in_memory=in_memory,
            expected_inputs=tuple(_hashes(i) for i in recipe["inputs"]),
            expected_vae=_hashes(vae) if vae else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SdtuneError(f"recipe: malformed sdtune merge recipe ({type(e).__name__}: {e})") from e


def check_expected(label: str, path: Path, expected: InputHashes) -> None:
    """Before a re-run: the recorded file must be there with its size and legacy hash (sha256 is checked
    while it is read, before the output is published)."""
    from ..io.hashes import legacy_hash

    if not path.is_file():
        raise SdtuneError(f"{label}: {path} is missing. The recipe needs the file with sha256 {expected.sha256}; "
                          f"put it back at that path and run again.")
    size = path.stat().st_size
    if size != expected.size or legacy_hash(path) != expected.autov1:
        raise SdtuneError(f"{label}: {path} has changed since the merge (size {size}, recorded {expected.size}); "
                          f"the recipe needs the file with sha256 {expected.sha256}.")


def verify_hashes(label: str, path: Path, expected: Optional[InputHashes], found: InputHashes) -> None:
    """After reading: the sha256 must be the recorded one, else nothing is written."""
    if expected is not None and found.sha256 != expected.sha256:
        raise SdtuneError(f"{label}: {path} has sha256 {found.sha256}, but the recipe recorded {expected.sha256}; "
                          f"the file changed since the merge, so the result would differ. Nothing was written.")
