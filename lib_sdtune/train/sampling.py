"""Sample images during training, from prompts in sd-scripts' prompt-file format.

A `.txt` file holds one prompt per line (`#` lines ignored) with sd-scripts' options: `--n` negative prompt,
`--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps, `--ss` sampler (`line_to_prompt_dict`); a `.json`
file holds a list of objects with the same keys spelled out (prompt, negative_prompt, width, height, seed,
scale, sample_steps, sample_sampler). Defaults are sd-scripts': 512x512, 30 steps, CFG 7.5. Images go to
`<output_dir>/sample/<name>_<epoch or step>_<index>_<time>.png`, made with diffusers' pipelines on the
model being trained (the adapter applied, dropouts off).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import SdtuneError

__all__ = ["SamplePrompt", "read_prompt_file", "SCHEDULERS", "generate_samples"]

# sd-scripts' --sample_sampler names -> diffusers scheduler class and extra config
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}), "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
_OPTION = re.compile(r"\s--(\w+)\s+")


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to make."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: Optional[int] = None
    scale: float = 7.5
    steps: int = 30
    sampler: Optional[str] = None  # None = the run's sample_sampler


def _parse_line(line: str, where: str) -> SamplePrompt:
    """`prompt --n neg --w 768 --h 512 --d 42 --l 7.5 --s 28 --ss euler_a` -> SamplePrompt."""
    parts = _OPTION.split(" " + line.strip())
    values: dict = {"prompt": parts[0].strip()}
    for key, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        try:
            if key == "n":
                values["negative_prompt"] = value
            elif key == "w":
                values["width"] = int(value)
            elif key == "h":
                values["height"] = int(value)
            elif key == "d":
                values["seed"] = int(value)
            elif key == "l":
                values["scale"] = float(value)
            elif key == "s":
                values["steps"] = max(1, min(1000, int(value)))
            elif key == "ss":
                values["sampler"] = value
            # other options (--g, --cn, --ctr, --rcfg, --fs) are for other model families: ignored like sd-scripts
        except ValueError:
            raise SdtuneError(f"{where}: --{key} {value!r} is not a number") from None
    return SamplePrompt(**values)


def read_prompt_file(path: str | Path) -> list[SamplePrompt]:
    """The prompts of an sd-scripts prompt file (.txt lines or .json list); errors name the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SdtuneError(f"{p}: cannot read the sample prompts ({e})") from None
    if p.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except ValueError as e:
            raise SdtuneError(f"{p}: not valid JSON ({e})") from None
        names = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
                 "seed": "seed", "scale": "scale", "sample_steps": "steps", "sample_sampler": "sampler"}
        return [SamplePrompt(**{names[k]: v for k, v in item.items() if k in names}) for item in items]
    prompts = [_parse_line(line, f"{p}:{i}") for i, line in enumerate(text.splitlines(), 1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SdtuneError(f"{p}: no prompts (one per line; lines starting with # are comments)")
    return prompts


def _scheduler(name: str, config: dict):
    import diffusers

    if name not in SCHEDULERS:
        raise SdtuneError(f"sample_sampler {name!r}: use one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config({**config, **extra})


def _pipeline(family: str, modules: dict, tokenizers: list, scheduler):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=tokenizers[0],
                  unet=modules["unet"], scheduler=scheduler)
    if family.startswith("sdxl"):
        return StableDiffusionXLPipeline(text_encoder_2=modules["text_encoder_2"], tokenizer_2=tokenizers[1], **common)
    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                   **common)


@torch.no_grad()
def generate_samples(prompts: list[SamplePrompt], family: str, modules: dict, tokenizers: list,
                     scheduler_config: dict, out_dir: Path, label: str, encode: Callable[[list[str]], Any],
                     default_sampler: str = "ddim", base_seed: int = 0) -> list[Path]:
    """Make one image per prompt and save it as `<out_dir>/<label>_<index>_<time>_<seed>.png`; returns the paths.

    `encode(captions) -> Conditioning` is the trainer's own text conditioning (clip skip, long prompts), so
    samples see the prompt exactly as training does; the pipeline gets the embeddings, not the text.
    """
    from ..io.atomic import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d%H%M%S")
    paths = []
    sdxl = family.startswith("sdxl")
    for i, sp in enumerate(prompts):
        pipe = _pipeline(family, modules, tokenizers, _scheduler(sp.sampler or default_sampler, scheduler_config))
        pipe.set_progress_bar_config(disable=True)
        seed = sp.seed if sp.seed is not None else base_seed + i
        gen = torch.Generator().manual_seed(seed)
        pos, neg = encode([sp.prompt]), encode([sp.negative_prompt])
        # the U-Net's compute dtype: with fp8_base its Linear/Conv weights are float8, its norms are not
        dtype = next(p.dtype for p in modules["unet"].parameters() if p.element_size() > 1)
        kwargs: dict[str, Any] = {"prompt_embeds": pos.hidden_states.to(dtype),
                                  "negative_prompt_embeds": neg.hidden_states.to(dtype)}
        if sdxl:
            kwargs.update(pooled_prompt_embeds=pos.pooled.to(dtype), negative_pooled_prompt_embeds=neg.pooled.to(dtype))
        width, height = max(64, sp.width // 8 * 8), max(64, sp.height // 8 * 8)
        image = pipe(width=width, height=height, num_inference_steps=sp.steps, guidance_scale=sp.scale,
                     generator=gen, **kwargs).images[0]
        path = out_dir / f"{label}_{i:02d}_{stamp}_{seed}.png"
        with atomic_write(path) as fh:
            image.save(fh, format="PNG")
        paths.append(path)
    return paths
