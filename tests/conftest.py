"""Shared pytest fixtures.

Nothing here downloads: every model is synthesized by `lib_sdtune.demo.tiny_models`, and
`HF_HUB_OFFLINE=1` is set before diffusers/transformers are imported so a stray hub lookup
fails at once instead of reaching for the network.

- `tiny_checkpoints` (and `tiny_fp32_checkpoints`, the same in fp32): session-wide mapping
  arch -> path of a tiny original-layout checkpoint
  (fp16, seed 0, with its `.yaml` where the architecture needs one), for every arch in
  `TINY_ARCHITECTURES`. Each file is written the first time a test asks for it, then reused.
  Treat the files as read-only; copy one to `tmp_path` before changing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


class LazyTinyCheckpoints(Mapping[str, Path]):
    """arch -> tiny checkpoint path, written on first access into one session directory."""

    def __init__(self, root: Path, dtype=None):
        from lib_sdtune.demo.tiny_models import TINY_ARCHITECTURES

        self._root = root
        self._dtype = dtype
        self._archs = TINY_ARCHITECTURES
        self._paths: dict[str, Path] = {}

    def __getitem__(self, arch: str) -> Path:
        if arch not in self._archs:
            raise KeyError(arch)
        if arch not in self._paths:
            from lib_sdtune.demo.tiny_models import write_tiny_checkpoint

            kwargs = {} if self._dtype is None else {"dtype": self._dtype}
            self._paths[arch] = write_tiny_checkpoint(arch, self._root, seed=0, **kwargs)
        return self._paths[arch]

    def __iter__(self) -> Iterator[str]:
        return iter(self._archs)

    def __len__(self) -> int:
        return len(self._archs)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> LazyTinyCheckpoints:
    """Tiny fp16 checkpoints (seed 0) by architecture: sd1, sd2, sd2-v, sdxl, sdxl-refiner."""
    return LazyTinyCheckpoints(tmp_path_factory.mktemp("tiny_checkpoints"))


@pytest.fixture(scope="session")
def tiny_fp32_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> LazyTinyCheckpoints:
    """The same tiny checkpoints in fp32, for tests that compare numbers at 1e-5."""
    import torch

    return LazyTinyCheckpoints(tmp_path_factory.mktemp("tiny_fp32_checkpoints"), dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_fp32_models(tiny_fp32_checkpoints):
    """arch -> the fp32 tiny checkpoint loaded once per test module (for tests that only wrap its layers)."""
    from lib_sdtune.models.loader import load_checkpoint

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_checkpoint(tiny_fp32_checkpoints[arch])
        return cache[arch]
    return get
