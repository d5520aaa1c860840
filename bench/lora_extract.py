"""LoRA extraction benchmark: exact SVD (torch.linalg.svd) vs randomized SVD (torch.svd_lowrank) at one rank,
on every U-Net layer shape sd-scripts extracts from a full-size SD1.5 (attention Linears 320..1280 wide, 1x1 and
3x3 convs with --conv-rank), in one run.

Shapes come from the reference key list (tests/data/reference/sd15_keys.json) through sdtune's LoRA name map;
each ΔW is random with a decaying spectrum (singular values ~ 1/i, as fine-tuning diffs have), so the
truncation error means something. Each distinct shape is timed once (or every layer with --all) and the
model total is the sum over layers; a timing is the best of --repeat runs (one run for exact SVDs over 2 s).
Prints time and relative reconstruction error ‖ΔW - up@down‖/‖ΔW‖ of each
method, and the randomized/exact ratios. Usage:
    python bench/lora_extract.py [--rank 32] [--conv-rank 32] [--device cpu] [--threads 1] [--repeat 3] [--all]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def layer_shapes(conv: bool) -> Counter:
    """(out, in*kh*kw, is 3x3) -> how many U-Net layers of SD1.5 sd-scripts extracts with that ΔW shape."""
    from lib_sdtune.io.detect import detect_architecture
    from lib_sdtune.merge.lora_common import checkpoint_name_map

    shapes = json.loads((ROOT / "tests" / "data" / "reference" / "sd15_keys.json").read_text())
    names = checkpoint_name_map(shapes, detect_architecture(shapes, "sd15 reference"), conv=conv)
    out: Counter = Counter()
    for t in names.values():
        if t.component == "unet":
            k = t.kernel_size or (1, 1)
            out[(t.out_features, t.in_features * k[0] * k[1], t.uses_conv_dim)] += 1
    return out


def make_delta(rows: int, cols: int, seed: int, device: str):
    """A random ΔW [rows, cols] whose singular values fall off like 1/i."""
    import torch

    g = torch.Generator().manual_seed(seed)
    m = min(rows, cols)
    decay = 1.0 / torch.arange(1, m + 1, dtype=torch.float32)
    a = torch.randn(rows, m, generator=g) / rows ** 0.5
    b = torch.randn(m, cols, generator=g) / cols ** 0.5
    return ((a * decay) @ b).to(device)


def run_method(delta, rank: int, method: str, device: str) -> tuple[float, float]:
    """(seconds, relative reconstruction error) of one extraction with sdtune's extract_module (no clamp)."""
    import torch

    from lib_sdtune.merge.lora_extract import extract_module

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    up, down, _ = extract_module(delta, rank, method, clamp=None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    err = float((delta - up @ down).norm() / delta.norm())
    return seconds, err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--conv-rank", type=int, default=32, help="rank of 3x3 convs (0: extract no ResNet layers)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--all", action="store_true", help="time every layer instead of each distinct shape once")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings (exact SVDs over 2 s: one)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    counts = layer_shapes(conv=args.conv_rank > 0)
    print(f"SD1.5 U-Net, {sum(counts.values())} layers in {len(counts)} distinct ΔW shapes; rank {args.rank}, "
          f"conv rank {args.conv_rank}; device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'ΔW shape':>16} {'layers':>6} | {'exact s':>8} {'err':>7} | {'random s':>8} {'err':>7} | "
          f"{'time x':>6} {'err x':>6}")
    totals = {"exact": [0.0, 0.0, 0.0], "randomized": [0.0, 0.0, 0.0]}  # seconds, Σ err², Σ ‖ΔW‖² weights
    for i, ((rows, cols, conv3), n) in enumerate(sorted(counts.items())):
        rank = args.conv_rank if conv3 else args.rank
        delta = make_delta(rows, cols, seed=i, device=args.device)
        row = {}
        for method in ("exact", "randomized"):
            run_method(delta[:64, :64].contiguous(), 4, method, args.device)  # warm up the kernels
            times, err = [], 0.0
            for _ in range(n if args.all else 1):
                best, err = run_method(delta, rank, method, args.device)
                for _ in range(args.repeat - 1 if best < 2.0 else 0):
                    best = min(best, run_method(delta, rank, method, args.device)[0])
                times.append(best)
            per_layer = sum(times) / len(times)
            totals[method][0] += per_layer * n
            totals[method][1] += err ** 2 * n
            totals[method][2] += n
            row[method] = (per_layer, err)
        (te, ee), (tr, er) = row["exact"], row["randomized"]
        print(f"{rows:>7}x{cols:<8} {n:>6} | {te:8.3f} {ee:7.4f} | {tr:8.3f} {er:7.4f} | {te / tr:6.1f} "
              f"{er / ee:6.3f}")
    (te, e2, n), (tr, r2, _) = totals["exact"], totals["randomized"]
    ee, er = (e2 / n) ** 0.5, (r2 / n) ** 0.5
    print(f"model total: exact {te:.1f} s (rms err {ee:.4f}), randomized {tr:.1f} s (rms err {er:.4f}); "
          f"randomized is {te / tr:.1f}x faster, error ratio {er / ee:.3f}"
          + ("" if args.all else " (total = per-shape time x layers)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
