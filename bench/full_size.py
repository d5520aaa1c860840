"""Full-size checkpoints with random weights in the real single-file key layout (SD1.5, SDXL base), for benches.

Shapes come from tests/data/reference; nothing is downloaded. Weights are N(0, 0.02) so a forward pass stays
finite in fp16/bf16; SD1.5 is about 2.1 GB in fp16, SDXL base about 6.9 GB.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = {"sd15": ROOT / "tests" / "data" / "reference" / "sd15_keys.json",
              "sdxl": ROOT / "tests" / "data" / "reference" / "sdxl_base_keys.json"}
SD15_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def write_random_checkpoint(arch: str, path: Path, seed: int = 1, metadata: dict | None = None) -> Path:
    """Write an fp16 checkpoint of `arch` (sd15 | sdxl) with random weights, tensor by tensor (low memory)."""
    import torch

    from lib_sdtune.io.safetensors_io import SafetensorsWriter

    shapes = {k: tuple(v) for k, v in json.loads(REFERENCES[arch].read_text()).items()}
    specs = {k: ("F16", s) for k, s in shapes.items()}
    if arch == "sd15":
        specs[SD15_POSITION_IDS] = ("I64", (1, 77))  # SD1.5 files carry it; the loader checks it
    gen = torch.Generator().manual_seed(seed)
    with SafetensorsWriter(path, specs, metadata or {"bench": "random weights"}) as w:
        for name in w.order:
            if specs[name][0] == "I64":
                w.write(name, torch.arange(77, dtype=torch.int64)[None])
            else:
                w.write(name, torch.randn(specs[name][1], generator=gen).mul_(0.02).half())
    return path
