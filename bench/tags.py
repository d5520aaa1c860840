"""Tag-tools benchmark: loading + statistics and a batch edit of N captions, against baselines of the same run.

Goals (issue #8): load + statistics of 10,000 captions < 1 s; a batch edit of 10,000 captions < 2 s.
Baselines: a naive loop reading every caption (`Path.read_text`, split, Counter), and a naive edit loop
rewriting each caption in place (`Path.write_text`: not atomic, no fsync -- the file-system floor that
taggui-style tools pay). With --atomic-write-baseline also a per-file loop over the house `atomic_write`
(fsync per file; minutes for 10,000). Variants run interleaved, best of --repeat, warm page cache, each
after an `os.sync()` so none pays for flushing the previous one's writes.
Usage:
    python bench/tags.py [--captions 10000] [--repeat 3] [--atomic-write-baseline]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_sdtune.io.atomic import atomic_write  # noqa: E402
from lib_sdtune.tags.history import EditSession  # noqa: E402
from lib_sdtune.tags.ops import AddTag, RemoveTag  # noqa: E402
from lib_sdtune.tags.stats import compute_stats  # noqa: E402
from lib_sdtune.tags.store import IMAGE_EXTS, load_captions  # noqa: E402


def make_dataset(root: Path, n: int, folders: int = 10) -> None:
    """n empty 'images' (the store never decodes them) with 20-30 booru-like tags each, in kohya folders."""
    rng = random.Random(0)
    vocab = [f"tag number {i}" for i in range(2000)]
    for i in range(n):
        folder = root / f"{i % folders + 1}_concept{i % folders}"
        if i < folders:
            folder.mkdir(parents=True)
        (folder / f"{i:06d}.png").write_bytes(b"")
        tags = ["trigger"] + rng.sample(vocab, rng.randint(20, 30))
        (folder / f"{i:06d}.txt").write_text(", ".join(tags), encoding="utf-8")


def naive_load_stats(root: Path) -> int:
    """Baseline: walk, read each caption with read_text, split, count."""
    freq: Counter = Counter()
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS:
            cap = p.with_suffix(".txt")
            if cap.exists():
                freq.update({t.strip() for t in cap.read_text(encoding="utf-8").split(",") if t.strip()})
    return len(freq)


def sdtune_load_stats(root: Path) -> int:
    return len(compute_stats(load_captions(root)).frequency)


def naive_edit(root: Path, tag: str, add: bool, atomic: bool = False) -> int:
    """Baseline: per caption, read, change, write in place (or with atomic_write: fsync each file)."""
    n = 0
    for cap in sorted(root.rglob("*.txt")):
        tags = [t.strip() for t in cap.read_text(encoding="utf-8").split(",") if t.strip()]
        tags = [tag, *tags] if add else [t for t in tags if t != tag]
        if atomic:
            with atomic_write(cap, "w", encoding="utf-8") as fh:
                fh.write(", ".join(tags))
        else:
            cap.write_text(", ".join(tags), encoding="utf-8")
        n += 1
    return n


def sdtune_edit(root: Path, tag: str, add: bool, apply_times: list[float] | None = None) -> int:
    """Load, then one batch edit (backup of all captions included), as `tag edit` does."""
    session = EditSession.open(root)
    result = session.apply([AddTag(tag) if add else RemoveTag(tag)])
    if apply_times is not None:
        apply_times.append(result.seconds)
    return len(result.changed)


def timed(fn, *args) -> float:
    """Seconds of one call, after flushing earlier writes (so no variant pays for the previous one's)."""
    if hasattr(os, "sync"):
        os.sync()
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--atomic-write-baseline", action="store_true", help="also time a per-file atomic_write loop")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("SDTUNE_BENCH_DIR")) as tmp:
        root = Path(tmp) / "dataset"
        make_dataset(root, args.captions)
        print(f"{args.captions} captions in 10 kohya folders; best of {args.repeat}; {os.cpu_count()} CPUs")
        load_base, load_ours = "baseline: read_text loop + Counter", "sdtune: load_captions + compute_stats"
        edit_base, edit_ours = ("baseline: in-place write_text loop (not atomic)",
                                "sdtune: EditSession.apply (load+backup+atomic write)")
        atomic_base = "baseline: per-file atomic_write loop (fsync each)"
        edit_only = "sdtune: of which the edit (select, ops, backup, write)"
        rows: dict[str, list[float]] = {load_base: [], load_ours: [], edit_base: [], edit_ours: [], edit_only: []}
        if args.atomic_write_baseline:
            rows[atomic_base] = []
        for k in range(args.repeat):  # interleaved, so disk and load drift hit both alike
            rows[load_base].append(timed(naive_load_stats, root))
            rows[load_ours].append(timed(sdtune_load_stats, root))
            rows[edit_base].append(timed(naive_edit, root, f"bench{k}", True))
            rows[edit_ours].append(timed(sdtune_edit, root, f"bench{k}", False, rows[edit_only]))
            if args.atomic_write_baseline:
                rows[atomic_base].append(timed(naive_edit, root, f"atomic{k}", True, True))
                timed(sdtune_edit, root, f"atomic{k}", False)
        best = {name: min(times) for name, times in rows.items()}
        print(f"{'variant':<56} {'best s':>8} {'all runs s':>20} {'ratio':>7}")
        for name in rows:
            base = best[load_base] if name in (load_base, load_ours) else best[edit_base]
            runs = " ".join(f"{t:.2f}" for t in rows[name])
            print(f"{name:<56} {best[name]:>8.3f} {runs:>20} {best[name] / base:>6.2f}x")
        print(f"goals: load+stats {best[load_ours]:.3f} s (< 1 s), batch edit {best[edit_only]:.3f} s "
              f"(< 2 s; {best[edit_ours]:.3f} s with the load); "
              f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
