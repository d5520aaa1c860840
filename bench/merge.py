"""Merge benchmark: sdtune's streaming checkpoint merge vs the I/O floor, on full-size SD1.5 shapes, in one run.

Builds two SD1.5-shaped fp16 checkpoints with random weights (every key and shape of
tests/data/reference/sd15_keys.json, plus the int64 CLIP position_ids) in a temp folder, then runs,
each in a fresh interpreter with the inputs dropped from the page cache first (cold):
- the I/O floor: read both files in 64 MiB chunks and write one file of the same size (fsync'ed);
- sdtune: `merge_checkpoints` weighted_sum alpha 0.5 to fp16 (the same work A1111's merger does).
Reports wall time, the ratio to the floor, CPU seconds, peak RSS (VmHWM: mapped file pages included,
what `/usr/bin/time -v` and task managers show) and bytes read (rchar). The temp folder is deleted after.
With --method NAME another method runs instead (three-model methods build a third file C and the
floor then reads three files). Usage:
    python bench/merge.py [--repeat 2] [--warm] [--method weighted_sum]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from page_cache import drop_cache  # noqa: E402 (bench/ is the script folder)

REFERENCE = ROOT / "tests" / "data" / "reference" / "sd15_keys.json"

# Each variant runs in its own interpreter; the timing excludes interpreter start and imports.
_PRELUDE = """
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from lib_sdtune.merge import MergeConfig, merge_checkpoints
INPUTS, OUT, METHOD = {inputs!r}, {out!r}, {method!r}

def report(seconds, extra):
    status = dict(line.split(':', 1) for line in open('/proc/self/status') if ':' in line)
    io = dict(line.split(': ') for line in open('/proc/self/io'))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps(dict(seconds=seconds, cpu=ru.ru_utime + ru.ru_stime,
                          vmhwm_mib=int(status['VmHWM'].split()[0]) / 1024, rchar=int(io['rchar']), **extra)))
t0 = time.perf_counter()
"""

FLOOR = """
buf = bytearray(64 << 20)
view = memoryview(buf)
files = [open(p, 'rb', buffering=0) for p in INPUTS]
with open(OUT, 'wb', buffering=0) as fo:
    while True:
        n = files[0].readinto(buf)
        if not n:
            break
        fo.write(view[:n])
        for f in files[1:]:
            f.readinto(buf)
    os.fsync(fo.fileno())
report(time.perf_counter() - t0, {})
"""

SDTUNE = """
r = merge_checkpoints(MergeConfig(INPUTS, OUT, method=METHOD, alpha=0.5, dtype='fp16'))
report(time.perf_counter() - t0, dict(bytes_read_reported=r.bytes_read))
"""


def make_inputs(folder: Path, count: int = 2) -> list[Path]:
    """SD1.5-shaped fp16 checkpoints with different random weights (about 2.1 GB each)."""
    from full_size import write_random_checkpoint

    return [write_random_checkpoint("sd15", folder / f"sd15_random_{seed}.safetensors", seed, {"bench": "merge"})
            for seed in range(1, count + 1)]


def run_variant(code: str, inputs: list[Path], out: Path, method: str, warm: bool) -> dict:
    """One variant in a fresh interpreter; returns its JSON report."""
    out.unlink(missing_ok=True)
    if warm:
        for p in inputs:
            with open(p, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass
    else:
        drop_cache(*inputs)
    script = _PRELUDE.format(root=str(ROOT), inputs=tuple(map(str, inputs)), out=str(out), method=method) + code
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"variant failed:\n{res.stderr}")
    report = json.loads(res.stdout.strip().splitlines()[-1])
    drop_cache(out)
    out.unlink(missing_ok=True)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="runs of each variant, interleaved (median reported)")
    ap.add_argument("--warm", action="store_true", help="inputs in the page cache instead of cold reads")
    ap.add_argument("--method", default="weighted_sum", help="merge method (default weighted_sum)")
    args = ap.parse_args()
    from lib_sdtune.merge import get_method

    n_models = get_method(args.method).models
    with tempfile.TemporaryDirectory(dir=os.environ.get("SDTUNE_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        inputs = make_inputs(folder, n_models)
        size = inputs[0].stat().st_size
        n_tensors = len(json.loads(REFERENCE.read_text())) + 1
        print(f"inputs: {n_models} x {size / 1e9:.2f} GB SD1.5-shaped fp16 ({n_tensors} "
              f"tensors each), built in {time.perf_counter() - t0:.0f} s; {'warm' if args.warm else 'cold'} cache, "
              f"{args.repeat} interleaved runs each, median; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        out = folder / "merged.safetensors"
        runs: dict[str, list[dict]] = {"floor": [], "sdtune": []}
        for _ in range(args.repeat):
            runs["floor"].append(run_variant(FLOOR, inputs, out, args.method, args.warm))
            runs["sdtune"].append(run_variant(SDTUNE, inputs, out, args.method, args.warm))
        floor_s = statistics.median(r["seconds"] for r in runs["floor"])
        print(f"{'variant':<58} {'wall s':>7} {'ratio':>6} {'CPU s':>6} {'peak RSS MiB':>13} {'read GB':>8}")
        labels = {"floor": f"I/O floor: read {n_models} files (64 MiB chunks), write 1, fsync",
                  "sdtune": f"sdtune merge_checkpoints {args.method} 0.5 -> fp16"}
        for name, rs in runs.items():
            wall = statistics.median(r["seconds"] for r in rs)
            cpu = statistics.median(r["cpu"] for r in rs)
            rss = max(r["vmhwm_mib"] for r in rs)
            read = statistics.median(r["rchar"] for r in rs)
            print(f"{labels[name]:<58} {wall:>7.1f} {wall / floor_s:>5.2f}x {cpu:>6.1f} {rss:>13.0f} "
                  f"{read / 1e9:>8.3f}")
        print(f"input bytes: {n_models * size / 1e9:.3f} GB; all runs (s): "
              + "; ".join(f"{k} {[round(r['seconds'], 1) for r in v]}" for k, v in runs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
