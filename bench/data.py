"""Data benchmark: images/s for decode + bucket (resize, crop) + augment (flip, colour), ready as tensors.

The baseline is the same work single-threaded in the caller's thread (what a training loop that loads
its own images does), measured in the same run; each sdtune variant prints its ratio to it. Images are
synthesized (photo-sized JPEGs and PNGs), so nothing is downloaded. Usage:
    python bench/data.py [--images 48] [--resolution 512] [--repeat 3] [--workers 2] [--gpu-step-ms 150]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_dataset(root: Path, n: int) -> Path:
    """`n` photo-like images (smooth gradients + grain) in one concept folder: 3/4 JPEG 1536x1024 or
    1024x1536, 1/4 PNG 1024x1024, each with a caption."""
    import numpy as np
    from PIL import Image

    folder = root / "train" / "1_bench"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = [(1536, 1024), (1024, 1536), (1536, 1024), (1024, 1024)][i % 4]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        if i % 4 == 3:
            Image.fromarray(img).save(folder / f"{i:04d}.png", compress_level=6)
        else:
            Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=92)
        (folder / f"{i:04d}.txt").write_text("bench, photo, gradient, grain", encoding="utf-8")
    return root / "train"


def _cpu() -> float:
    """CPU seconds of this process and its finished children (worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(data, mode: str, workers: int, step_s: float = 0.0) -> tuple[int, float, float, float]:
    """(images, wall seconds, seconds the simulated GPU was busy, CPU seconds) for one epoch of `data`.

    `step_s` > 0 simulates a training step per batch (a sleep, which releases the GIL as CUDA waits do).
    """
    t0, c0 = time.perf_counter(), _cpu()
    n = 0
    busy = 0.0
    batches = (data.torch_loader(1, num_workers=workers, multiprocessing_context="fork") if mode == "process"
               else data.iter_epoch(1))
    for b in batches:
        n += len(b)
        if step_s:
            time.sleep(step_s)
            busy += step_s
    if mode == "process":
        del batches  # joins the worker processes, so their CPU time is counted
    return n, time.perf_counter() - t0, busy, _cpu() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--gpu-step-ms", type=int, default=150)
    args = ap.parse_args()

    import torch

    from lib_sdtune.data.config import DatasetConfig, SubsetConfig
    from lib_sdtune.data.loader import LoaderOptions, make_training_data
    from lib_sdtune.data.scan import scan_folder

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("SDTUNE_BENCH_DIR")) as tmp:
        train = make_dataset(Path(tmp), args.images)
        cfg = DatasetConfig(resolution=(args.resolution, args.resolution), enable_bucket=True, batch_size=4,
                            max_bucket_reso=max(1024, args.resolution * 2))
        scan = scan_folder(train, dataset=cfg, subset=SubsetConfig(flip_aug=True, color_aug=True))
        w = args.workers
        variants = [  # (label, options, mode, workers)
            ("baseline: one thread, in the training loop", LoaderOptions(workers=0), "serial", 0),
            (f"sdtune: iter_epoch, {w} decode threads", LoaderOptions(workers=w, prefetch_batches=2 * w), "thread", w),
            (f"sdtune: iter_epoch, {w} threads + jpeg_draft", LoaderOptions(workers=w, prefetch_batches=2 * w,
                                                                             jpeg_draft=True), "thread", w),
            (f"sdtune: torch_loader, {w} worker processes", LoaderOptions(workers=w, prefetch_batches=2 * w),
             "process", w),
        ]
        print(f"{args.images} images (3/4 JPEG 1536x1024, 1/4 PNG 1024x1024) -> buckets at {args.resolution}, "
              f"flip_aug + color_aug, batch 4; {os.cpu_count()} CPUs; best of {args.repeat}")
        for step_ms in (0, args.gpu_step_ms):
            best: dict[str, tuple[float, float, float]] = {}
            for _ in range(args.repeat):  # interleaved, so load from other processes hits all alike
                for label, opts, mode, workers in variants:
                    data = make_training_data([scan], opts)
                    n, secs, busy, cpu = run(data, mode, workers, step_ms / 1000)
                    if n / secs > best.get(label, (0.0, 0.0, 0.0))[0]:
                        best[label] = (n / secs, busy / secs, cpu / n * 1000)
            base = best[variants[0][0]][0]
            if step_ms == 0:
                print("\ndecode + bucket + augment alone")
                print(f"{'variant':<52} {'images/s':>9} {'ratio':>7} {'CPU ms/image':>13}")
                for label, *_ in variants:
                    ips, _, cpu_ms = best[label]
                    print(f"{label:<52} {ips:>9.1f} {ips / base:>6.2f}x {cpu_ms:>13.1f}")
            else:
                print(f"\nwith a simulated {step_ms} ms GPU step per batch of 4 (the GPU's share of wall time)")
                print(f"{'variant':<52} {'images/s':>9} {'ratio':>7} {'GPU busy':>9}")
                for label, *_ in variants:
                    ips, share, _ = best[label]
                    print(f"{label:<52} {ips:>9.1f} {ips / base:>6.2f}x {share:>8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
