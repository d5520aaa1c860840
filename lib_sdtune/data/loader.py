"""Batches for training: one bucket per batch, pixels in [-1, 1] or cached latents, captions for this step.

`TrainingData` turns scanned datasets into an epoch plan (sd-scripts' bucket batches, reshuffled per
epoch from the seed) and loads batches. Every batch is a pure function of (seed, epoch, batch index,
step), so it can be built in any thread or process and a resumed run sees the same data.
`iter_epoch` decodes ahead in a thread pool (Pillow releases the GIL while decoding and resizing);
`torch_loader` gives a `torch.utils.data.DataLoader` over worker processes instead.
"""

from __future__ import annotations

import random
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch

from ..errors import SdtuneError
from .augment import color_aug, decide_flip, flip_pixels, grayscale
from .buckets import BucketPlan, plan_buckets
from .captions import CaptionStep, process_caption
from .config import SubsetConfig
from .images import ImageReadError, load_rgb, resize_and_crop, to_tensor
from .scan import DatasetScan, ImageRecord

if TYPE_CHECKING:
    from .latent_cache import LatentCache


@dataclass(frozen=True)
class LoaderOptions:
    """How batches are produced (not what is in them)."""

    seed: int = 0
    workers: int = 2  # decode threads for iter_epoch (or processes for torch_loader); 0 = in the caller
    prefetch_batches: int = 4  # batches decoded ahead of the trainer
    max_train_steps: int = 0  # for token warm-up given as a fraction
    gradient_accumulation_steps: int = 1  # batches per optimizer step (token warm-up counts steps)
    jpeg_draft: bool = False  # let the JPEG decoder shrink large photos (faster, nearly identical pixels)


@dataclass(frozen=True)
class BatchKey:
    """Which batch: its dataset, its position in the epoch, and the items (indices into that dataset)."""

    epoch: int
    index: int
    dataset: int
    items: tuple[int, ...]


@dataclass
class Batch:
    """What the trainer gets for one step; per-sample lists are in the same order as `captions`.

    Sizes are (height, width) and crops (top, left), the order SDXL's size conditioning takes them.
    """

    key: BatchKey
    captions: list[str]
    pixels: Optional[torch.Tensor]  # B,3,H,W float32 in [-1, 1]; None when latents come from the cache
    latents: Optional[torch.Tensor]  # B,C,H/8,W/8 from the latent cache, unscaled (as the VAE gives them)
    original_sizes_hw: list[tuple[int, int]]
    crop_top_lefts: list[tuple[int, int]]
    target_sizes_hw: list[tuple[int, int]]
    flipped: list[bool]
    is_reg: list[bool]
    loss_weights: torch.Tensor  # B: prior_loss_weight for reg images, else 1.0
    network_multipliers: torch.Tensor  # B: the dataset's network_multiplier
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # images that failed to decode this time

    def __len__(self) -> int:
        return len(self.captions)


def sample_rng(seed: int, epoch: int, index: int, position: int) -> random.Random:
    """The random stream of one sample in one batch: independent of thread, process and timing."""
    return random.Random(f"sdtune-data:{seed}:{epoch}:{index}:{position}")


class TrainingData:
    """Scanned datasets + bucket plans + the latent cache: the data side of one training run."""

    def __init__(self, scans: Sequence[DatasetScan], options: Optional[LoaderOptions] = None,
                 latent_cache: Optional[LatentCache] = None):
        self.scans = tuple(scans)
        self.options = options or LoaderOptions()
        self.latent_cache = latent_cache
        self.items: tuple[tuple[ImageRecord, ...], ...] = tuple(s.epoch_images for s in self.scans)
        self.plans: tuple[BucketPlan, ...] = tuple(
            plan_buckets(s.config, [r.size for r in items], [r.repeats for r in items])
            for s, items in zip(self.scans, self.items))

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one epoch over all datasets (sd-scripts' len(train_dataloader))."""
        return sum(p.batches_per_epoch for p in self.plans)

    def epoch_plan(self, epoch: int) -> list[BatchKey]:
        """The epoch's batches in order: each dataset's bucket batches, then the datasets interleaved,
        all shuffled from `seed + epoch`."""
        seed = self.options.seed
        keys = [(d, items) for d, plan in enumerate(self.plans) for items in plan.epoch_batches(seed, epoch)]
        if len(self.plans) > 1:
            random.Random(f"sdtune-datasets:{self.options.seed}:{epoch}").shuffle(keys)
        return [BatchKey(epoch, i, d, items) for i, (d, items) in enumerate(keys)]

    def subset_of(self, dataset: int, item: int) -> SubsetConfig:
        """The subset settings an item was scanned with."""
        rec = self.items[dataset][item]
        return self.scans[dataset].subsets[rec.subset_index].config

    def step_of(self, key: BatchKey, first_step: int = 0) -> int:
        """The optimizer step a batch belongs to (for token warm-up), counting from `first_step` at index 0."""
        return first_step + key.index // max(1, self.options.gradient_accumulation_steps)

    def load_batch(self, key: BatchKey, step: int = 0) -> Batch:
        """Decode, resize, crop and augment one batch, and process its captions for this step."""
        scan, plan = self.scans[key.dataset], self.plans[key.dataset]
        cfg = scan.config
        at = CaptionStep(epoch=key.epoch, step=step, max_train_steps=self.options.max_train_steps)
        captions, pixels, latents, orig, crops, targets, flips, regs, paths, skipped = ([] for _ in range(10))
        for pos, item in enumerate(key.items):
            rec = self.items[key.dataset][item]
            sub = scan.subsets[rec.subset_index].config
            choice = plan.choices[item]
            rng = sample_rng(self.options.seed, key.epoch, key.index, pos)
            flipped = decide_flip(sub.flip_aug, rng)
            cached = None
            if self.latent_cache is not None:
                if rec.path in self.latent_cache.failed:
                    skipped.append((rec.path, self.latent_cache.failed[rec.path]))
                    continue
                cached = self.latent_cache.get(rec.path, choice.bucket, flipped)
                if cached is None:
                    raise SdtuneError(f"no cached latents for {rec.path} at {choice.bucket}: build the latent "
                                      f"cache (LatentCache.build) before training with it")
            if cached is not None:
                latents.append(cached.latents)
                size, crop = cached.original_size, cached.crop_top_left
            else:
                try:
                    prepared = self._prepare(rec, sub, choice, rng, cfg.resize_interpolation)
                except ImageReadError as e:
                    skipped.append((rec.path, str(e)))
                    continue
                px = prepared.pixels
                if sub.color_aug:
                    px = color_aug(px, rng)
                if sub.grayscale_aug_rate > 0:
                    px = grayscale(px, rng, sub.grayscale_aug_rate)
                if flipped:
                    px = flip_pixels(px)
                pixels.append(px)
                size, crop = prepared.original_size, prepared.crop_top_left
            bw, bh = choice.bucket
            top, left = crop
            if flipped:  # the crop's left edge measured in the mirrored image
                left = max(0, choice.resized_size[0] - bw - left)
            orig.append((int(size[1]), int(size[0])))
            crops.append((int(top), int(left)))
            targets.append((bh, bw))
            flips.append(bool(flipped))
            regs.append(rec.is_reg)
            paths.append(rec.path)
            captions.append(process_caption(rec.caption, sub, rng, at))
        n = len(captions)
        weights = torch.tensor([cfg.prior_loss_weight if r else 1.0 for r in regs], dtype=torch.float32)
        return Batch(key, captions, to_tensor(pixels) if pixels else None,
                     torch.stack(latents) if latents else None, orig, crops, targets, flips, regs, weights,
                     torch.full((n,), float(cfg.network_multiplier)), paths, skipped)

    def _prepare(self, rec: ImageRecord, sub: SubsetConfig, choice, rng: random.Random, interpolation):
        """Decode and cut one image to its bucket."""
        draft = choice.resized_size if self.options.jpeg_draft else None
        im = load_rgb(rec.path, draft)
        if im.size != rec.size and draft is None:
            raise ImageReadError(f"its size changed since the scan ({rec.size} -> {im.size}); scan again")
        return resize_and_crop(im, rec.size, choice.bucket, choice.resized_size, sub.random_crop, rng,
                               sub.resize_interpolation or interpolation)

    def shard_plan(self, epoch: int, rank: int = 0, world: int = 1) -> list[BatchKey]:
        """One process's batches in data-parallel training: every `world`-th batch from `rank`, the plan
        padded by wrapping around so every process gets the same count (as accelerate's loader does)."""
        keys = self.epoch_plan(epoch)
        if world <= 1:
            return keys
        per = -(-len(keys) // world)
        padded = (keys * (1 + per * world // max(1, len(keys))))[:per * world]
        return padded[rank::world]

    def iter_epoch(self, epoch: int, first_step: int = 0, start_index: int = 0,
                   executor: Optional[Executor] = None, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Batches of one epoch in order, decoded `prefetch_batches` ahead in `workers` threads.

        `start_index` skips batches already trained (resume); batches whose images all failed to
        decode are left out (their files are named in the `skipped` list of the next batch yielded).
        `rank`/`world` give this process its share in data-parallel training (`shard_plan`).
        """
        accum = max(1, self.options.gradient_accumulation_steps)
        keys = self.shard_plan(epoch, rank, world)[start_index:]
        # the optimizer step each batch belongs to, counted on this process's own batches
        jobs = [(key, first_step + (start_index + i) // accum) for i, key in enumerate(keys)]
        workers = self.options.workers
        if workers <= 0 and executor is None:
            pending: list[tuple[Path, str]] = []
            for key, step in jobs:
                yield from self._emit(self.load_batch(key, step), pending)
            return
        own = executor is None
        pool = executor or ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdtune-data")
        try:
            ahead = max(1, self.options.prefetch_batches)
            futures: list[Future] = []
            pending_skips: list[tuple[Path, str]] = []
            it = iter(jobs)
            for key, step in it:
                futures.append(pool.submit(self.load_batch, key, step))
                if len(futures) >= ahead:
                    break
            while futures:
                batch = futures.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    futures.append(pool.submit(self.load_batch, *nxt))
                yield from self._emit(batch, pending_skips)
        finally:
            if own:
                pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _emit(batch: Batch, pending: list) -> Iterator[Batch]:
        """Yield a batch unless empty; skips of an empty batch are carried to the next one."""
        if len(batch) == 0:
            pending.extend(batch.skipped)
            return
        if pending:
            batch.skipped = pending + batch.skipped
            pending.clear()
        yield batch

    def torch_dataset(self) -> BatchDataset:
        """A map-style torch Dataset whose keys are `BatchKey`s (use with `epoch_sampler`)."""
        return BatchDataset(self)

    def torch_loader(self, epoch: int, first_step: int = 0, num_workers: Optional[int] = None,
                     **kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader over worker processes yielding this epoch's `Batch`es in order."""
        n = self.options.workers if num_workers is None else num_workers
        kw = {"num_workers": n, "batch_size": None, "collate_fn": _identity, **kwargs}
        if n > 0:
            kw.setdefault("prefetch_factor", max(1, self.options.prefetch_batches // max(1, n)))
        return torch.utils.data.DataLoader(BatchDataset(self, first_step), sampler=self.epoch_plan(epoch), **kw)


def _identity(x):
    """DataLoader collate for batches that are already batches."""
    return x


class BatchDataset(torch.utils.data.Dataset):
    """torch Dataset view: `dataset[batch_key] -> Batch` (the sampler, in the main process, picks keys)."""

    def __init__(self, data: TrainingData, first_step: int = 0):
        self.data = data
        self.first_step = first_step

    def __getitem__(self, key: BatchKey) -> Batch:
        return self.data.load_batch(key, self.data.step_of(key, self.first_step))

    def __len__(self) -> int:
        return self.data.batches_per_epoch


def make_training_data(scans: Sequence[DatasetScan], options: Optional[LoaderOptions] = None,
                       latent_cache: Optional[LatentCache] = None) -> TrainingData:
    """Entry point: the batches of a training run from scanned datasets."""
    return TrainingData(scans, options, latent_cache)
