"""VAE latents cached in memory or beside the images, keyed so a stale entry is never reused.

An entry is valid only for the same VAE (`vae_id`), bucket, resized size, flip and image file (size
and modification time). Anything else is rebuilt, and the rebuild is reported. Disk entries are
safetensors files `<stem>_<W>x<H>_sdtune_latents.safetensors` (W x H = the bucket) with the key in the
header, written atomically. Latents are stored as the VAE gives them (unscaled, one sample, float32),
as sd-scripts caches them; the trainer applies the scaling factor.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from ..errors import SdtuneError
from ..io.atomic import atomic_write
from .augment import flip_pixels
from .images import ImageReadError, load_rgb, resize_and_crop, to_tensor

if TYPE_CHECKING:
    from .loader import TrainingData

FORMAT = "sdtune-latents-1"
SUFFIX = "_sdtune_latents.safetensors"


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short hash of the VAE's weights and class: changes whenever the VAE does."""
    h = hashlib.sha256(type(vae).__name__.encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CachedLatents:
    """One image's latents for one bucket and flip, with the size conditioning it was made with."""

    latents: torch.Tensor  # C, H/8, W/8 float32
    original_size: tuple[int, int]  # (width, height)
    crop_top_left: tuple[int, int]  # (top, left), unflipped


@dataclass
class CacheReport:
    """What `build` did: entries encoded, reused, rebuilt (with why) and images that failed."""

    encoded: int = 0
    reused: int = 0
    rebuilt: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def _file_stamp(path: Path) -> str:
    """Size and mtime of an image file: an edited image invalidates its latents."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


class LatentCache:
    """Latents by (image, bucket, flip), in memory (`to_disk=False`) or in files beside the images."""

    def __init__(self, vae_id: str, to_disk: bool = False):
        if not vae_id:
            raise SdtuneError("a latent cache needs the VAE's identity (vae_fingerprint(vae) or its file hash)")
        self.vae_id = vae_id
        self.to_disk = to_disk
        self._mem: dict[tuple[Path, tuple[int, int]], dict] = {}
        self.failed: dict[Path, str] = {}  # images that could not be decoded when the cache was built

    @staticmethod
    def disk_path(image: Path, bucket: tuple[int, int]) -> Path:
        """Where an image's latents for a bucket live on disk."""
        return image.with_name(f"{image.stem}_{bucket[0]:04d}x{bucket[1]:04d}{SUFFIX}")

    def _expected(self, image: Path, bucket: tuple[int, int], resized: tuple[int, int], flip: bool,
                  interpolation: Optional[str]) -> dict[str, str]:
        """The key an entry must carry to be reused."""
        return {"format": FORMAT, "vae": self.vae_id, "bucket": f"{bucket[0]},{bucket[1]}",
                "resized": f"{resized[0]},{resized[1]}", "interpolation": str(interpolation or "auto"),
                "flip": "1" if flip else "0", "image": _file_stamp(image)}

    def _read(self, image: Path, bucket: tuple[int, int], load: bool = True) -> Optional[dict]:
        """The entry's header and tensors (names only, with `load=False`) from memory or disk, or None."""
        if not self.to_disk:
            return self._mem.get((image, bucket))
        path = self.disk_path(image, bucket)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: (f.get_tensor(k) if load else None) for k in f.keys()}
        except Exception as e:  # a torn or foreign file is stale, never fatal
            return {"meta": {"error": f"unreadable ({e})"}, "tensors": {}}
        return {"meta": meta, "tensors": tensors}

    def stale_reason(self, image: Path, bucket: tuple[int, int], resized: tuple[int, int], flip: bool,
                     interpolation: Optional[str] = None) -> Optional[str]:
        """None when a valid entry exists; otherwise why not ("missing", "made with another VAE", ...)."""
        entry = self._read(image, bucket, load=False)
        if entry is None:
            return "missing"
        meta = entry["meta"]
        if "error" in meta:
            return meta["error"]
        want = self._expected(image, bucket, resized, flip, interpolation)
        names = {"format": "an older cache format", "vae": "made with another VAE", "bucket": "another bucket",
                 "resized": "another resize", "interpolation": "another resize_interpolation",
                 "image": "the image file changed since"}
        for k, why in names.items():
            if meta.get(k) != want[k]:
                return why
        if flip and (meta.get("flip") != "1" or "latents_flipped" not in entry["tensors"]):
            return "no flipped latents (flip_aug was off when it was made)"
        if "latents" not in entry["tensors"]:
            return "no latents in the file"
        return None

    def get(self, image: Path, bucket: tuple[int, int], flipped: bool) -> Optional[CachedLatents]:
        """The cached latents of an image for a bucket (the mirrored version if `flipped`), or None."""
        entry = self._read(image, bucket)
        if entry is None or entry["meta"].get("vae") != self.vae_id:
            return None
        meta, tensors = entry["meta"], entry["tensors"]
        lat = tensors.get("latents_flipped" if flipped else "latents")
        if lat is None:
            return None
        ow, oh = (int(v) for v in meta["original_size"].split(","))
        top, left = (int(v) for v in meta["crop"].split(","))
        return CachedLatents(lat, (ow, oh), (top, left))

    def _store(self, image: Path, bucket: tuple[int, int], meta: dict[str, str], tensors: dict[str, torch.Tensor]):
        if not self.to_disk:
            self._mem[(image, bucket)] = {"meta": meta, "tensors": tensors}
            return
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
        with atomic_write(self.disk_path(image, bucket)) as fh:
            fh.write(data)

    def build(self, data: TrainingData, vae: torch.nn.Module, batch_size: int = 1, seed: int = 0,
              progress: Optional[Callable[[int, int, str], None]] = None,
              cancelled: Optional[Callable[[], bool]] = None, workers: int = 2) -> CacheReport:
        """Encode every image of `data` that has no valid entry (stale ones are rebuilt and reported);
        images are decoded in `workers` threads while the VAE encodes the previous group."""
        check_cacheable(data)
        todo, report = [], CacheReport()
        for d, (items, plan) in enumerate(zip(data.items, data.plans)):
            for i, rec in enumerate(items):
                choice = plan.choices[i]
                sub = data.subset_of(d, i)
                interp = sub.resize_interpolation or data.scans[d].config.resize_interpolation
                why = self.stale_reason(rec.path, choice.bucket, choice.resized_size, sub.flip_aug, interp)
                if why is None:
                    report.reused += 1
                    continue
                if why != "missing":
                    report.rebuilt.append((rec.path, why))
                todo.append((rec, choice, sub.flip_aug, interp))
        by_bucket: dict[tuple[int, int], list] = {}
        for t in todo:
            by_bucket.setdefault(t[1].bucket, []).append(t)
        groups = [g[i:i + max(1, batch_size)] for _, g in sorted(by_bucket.items())
                  for i in range(0, len(g), max(1, batch_size))]
        param = next(vae.parameters())
        gen = torch.Generator(device=param.device).manual_seed(seed)
        done = 0
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sdtune-latents") as pool:
            pending = [pool.submit(_decode_group, g) for g in groups[:workers + 1]]
            for n, group in enumerate(groups):
                ready, pixels, failed = pending.pop(0).result()
                if n + workers + 1 < len(groups):
                    pending.append(pool.submit(_decode_group, groups[n + workers + 1]))
                report.failed += failed
                self.failed.update(failed)
                if cancelled is not None and cancelled():
                    for f in pending:
                        f.cancel()
                    break
                self._encode(ready, pixels, vae, param, gen, report)
                done += len(group)
                if progress is not None:
                    progress(done, len(todo), group[-1][0].path.name)
        return report

    def _encode(self, ready: list, pixels: list, vae: torch.nn.Module, param: torch.Tensor, gen: torch.Generator,
                report: CacheReport) -> None:
        """Encode one bucket's images (and their mirrors) in one VAE call, then store each."""
        if not ready:
            return
        x = to_tensor(pixels)
        with torch.no_grad():
            lat = vae.encode(x.to(param.device, param.dtype)).latent_dist.sample(generator=gen)
        lat = lat.float().cpu()
        if not torch.isfinite(lat).all():
            raise SdtuneError(f"the VAE gave NaN/inf latents for {ready[0][0].path.name} (SDXL's VAE overflows in "
                              f"fp16): encode in fp32/bf16, or use the fp16-fix SDXL VAE")
        k = 0
        for rec, choice, flip, interp, prep in ready:
            tensors = {"latents": lat[k].clone()}
            k += 1
            if flip:
                tensors["latents_flipped"] = lat[k].clone()
                k += 1
            meta = self._expected(rec.path, choice.bucket, choice.resized_size, flip, interp)
            meta["original_size"] = f"{prep.original_size[0]},{prep.original_size[1]}"
            meta["crop"] = f"{prep.crop_top_left[0]},{prep.crop_top_left[1]}"
            self._store(rec.path, choice.bucket, meta, tensors)
            report.encoded += 1


def _decode_group(group: list) -> tuple[list, list, list]:
    """(ready, pixels, failed) for images that share a bucket: decoded and centre-cut, mirrors added."""
    ready, pixels, failed = [], [], []
    for rec, choice, flip, interp in group:
        try:
            im = load_rgb(rec.path)
        except ImageReadError as e:
            failed.append((rec.path, str(e)))
            continue
        prep = resize_and_crop(im, rec.size, choice.bucket, choice.resized_size, False, None, interp)
        ready.append((rec, choice, flip, interp, prep))
        pixels.append(prep.pixels)
        if flip:
            pixels.append(flip_pixels(prep.pixels))
    return ready, pixels, failed


def check_cacheable(data: TrainingData) -> None:
    """Refuse latent caching with per-step pixel changes (sd-scripts' `is_latent_cacheable`, plus grayscale)."""
    for scan in data.scans:
        for sub in scan.subsets:
            c = sub.config
            bad = [n for n, on in (("color_aug", c.color_aug), ("random_crop", c.random_crop),
                                   ("grayscale_aug_rate", c.grayscale_aug_rate > 0)) if on]
            if bad:
                raise SdtuneError(f"latents cannot be cached for {os.path.basename(c.image_dir)}: {', '.join(bad)} "
                                  f"change the pixels every step. Turn caching off, or turn {' and '.join(bad)} off.")
