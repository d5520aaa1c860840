"""Diagnosis benchmark: `repair diagnose` of a full-size SD1.5-shaped checkpoint pair vs just reading both files.

Builds a base and a "tuned" SD1.5-shaped fp16 checkpoint (every key and shape of
tests/data/reference/sd15_keys.json plus the int64 CLIP position_ids; random weights, the tuned one = base +
noise of 10% of the weights' size) in a temp folder, then runs, each in a fresh interpreter with the inputs
dropped from the page cache first (cold):
- the floor: read both files in 64 MiB chunks (what any comparison of the two must at least do);
- sdtune: `diagnose(DiagnoseConfig(base, model=tuned))`: both text encoders loaded and run on 12 control
  prompts, every U-Net/TE tensor pair streamed for the per-block ‖ΔW‖/‖W‖, verdicts.
With --lora also a rank-32 LoRA (TE + U-Net attention layers, random factors) diagnosed against the base
(its floor: reading the base and the LoRA file). Reports wall time, the ratio to the floor, CPU seconds and
peak RSS (VmHWM). The temp folder is deleted after. Usage:
    python bench/diagnose.py [--repeat 1] [--warm] [--lora]
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
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
LIMIT_S = 120.0  # the budget for a full-size diagnosis on this machine

_PRELUDE = """
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from lib_sdtune.repair.diagnose import DiagnoseConfig, diagnose
INPUTS = {inputs!r}

def report(seconds, extra):
    status = dict(line.split(':', 1) for line in open('/proc/self/status') if ':' in line)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps(dict(seconds=seconds, cpu=ru.ru_utime + ru.ru_stime,
                          vmhwm_mib=int(status['VmHWM'].split()[0]) / 1024, **extra)))
t0 = time.perf_counter()
"""

FLOOR = """
buf = bytearray(64 << 20)
for p in INPUTS:
    with open(p, 'rb', buffering=0) as f:
        while f.readinto(buf):
            pass
report(time.perf_counter() - t0, {})
"""

CHECKPOINT = """
r = diagnose(DiagnoseConfig(INPUTS[0], model=INPUTS[1]))
report(time.perf_counter() - t0, dict(triggered=[v.symptom for v in r.triggered], inner=r.seconds))
"""

LORA = """
r = diagnose(DiagnoseConfig(INPUTS[0], lora=INPUTS[1]))
report(time.perf_counter() - t0, dict(triggered=[v.symptom for v in r.triggered], inner=r.seconds,
                                      modules=len(r.lora.modules)))
"""


def make_pair(folder: Path) -> list[Path]:
    """base and tuned SD1.5-shaped fp16 checkpoints (about 2.1 GB each)."""
    import torch

    from lib_sdtune.io.safetensors_io import SafetensorsWriter

    shapes = {k: tuple(v) for k, v in json.loads(REFERENCE.read_text()).items()}
    specs = {k: ("F16", s) for k, s in shapes.items()}
    specs[POSITION_IDS] = ("I64", (1, 77))
    base, tuned = folder / "sd15_base.safetensors", folder / "sd15_tuned.safetensors"
    g_base, g_noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    with SafetensorsWriter(base, specs, {"bench": "diagnose"}) as wb, \
            SafetensorsWriter(tuned, specs, {"bench": "diagnose"}) as wt:
        for name in wb.order:
            if name == POSITION_IDS:
                ids = torch.arange(77, dtype=torch.int64)[None]
                wb.write(name, ids)
                wt.write(name, ids)
                continue
            w = torch.randn(specs[name][1], generator=g_base).mul_(0.02)
            wb.write(name, w.half())
            wt.write(name, w.add_(torch.randn(w.shape, generator=g_noise), alpha=0.002).half())
    return [base, tuned]


def make_lora(folder: Path, rank: int = 32) -> Path:
    """A rank-32 LoRA on every TE and U-Net attention layer of SD1.5 (sd-scripts' default targets), random."""
    import torch

    from lib_sdtune.io.detect import detect_architecture
    from lib_sdtune.merge.lora_common import checkpoint_name_map, minimal_metadata, target_shape, write_lora

    shapes = json.loads(REFERENCE.read_text())
    names = checkpoint_name_map(shapes, detect_architecture(shapes, "sd15 reference"), conv=False)
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, t in names.items():
        out_f, in_f = target_shape(t)[:2]
        k = t.kernel_size or (1, 1)
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, *k, generator=g) / in_f ** 0.5).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, *((1, 1) if t.kernel_size else ()),
                                                          generator=g) * 0.01).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    out = folder / "lora_r32.safetensors"
    return write_lora(tensors, out, minimal_metadata("sd_v1", rank, rank, out))


def run_variant(code: str, inputs: list[Path], warm: bool) -> dict:
    """One variant in a fresh interpreter; returns its JSON report."""
    if warm:
        for p in inputs:
            with open(p, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass
    else:
        drop_cache(*inputs)
    script = _PRELUDE.format(root=str(ROOT), inputs=tuple(map(str, inputs))) + code
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"variant failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _row(label: str, runs: list[dict], floor_s: float) -> str:
    wall = statistics.median(r["seconds"] for r in runs)
    cpu = statistics.median(r["cpu"] for r in runs)
    rss = max(r["vmhwm_mib"] for r in runs)
    return f"{label:<62} {wall:>7.1f} {wall / floor_s:>5.2f}x {cpu:>6.1f} {rss:>13.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs of each variant, interleaved (median reported)")
    ap.add_argument("--warm", action="store_true", help="inputs in the page cache instead of cold reads")
    ap.add_argument("--lora", action="store_true", help="also diagnose a rank-32 LoRA against the base")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("SDTUNE_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        pair = make_pair(folder)
        lora = make_lora(folder) if args.lora else None
        print(f"inputs: 2 x {pair[0].stat().st_size / 1e9:.2f} GB SD1.5-shaped fp16"
              + (f" + a {lora.stat().st_size / 1e6:.0f} MB rank-32 LoRA" if lora else "")
              + f", built in {time.perf_counter() - t0:.0f} s; {'warm' if args.warm else 'cold'} cache, "
                f"{args.repeat} run(s) each, median; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        runs: dict[str, list[dict]] = {"floor": [], "checkpoint": [], "lora floor": [], "lora": []}
        for _ in range(args.repeat):
            runs["floor"].append(run_variant(FLOOR, pair, args.warm))
            runs["checkpoint"].append(run_variant(CHECKPOINT, pair, args.warm))
            if lora is not None:
                runs["lora floor"].append(run_variant(FLOOR, [pair[0], lora], args.warm))
                runs["lora"].append(run_variant(LORA, [pair[0], lora], args.warm))
        print(f"{'variant':<62} {'wall s':>7} {'ratio':>6} {'CPU s':>6} {'peak RSS MiB':>13}")
        floor_s = statistics.median(r["seconds"] for r in runs["floor"])
        print(_row("floor: read base + tuned (64 MiB chunks)", runs["floor"], floor_s))
        print(_row("sdtune diagnose --model tuned --base base", runs["checkpoint"], floor_s))
        if lora is not None:
            lora_floor = statistics.median(r["seconds"] for r in runs["lora floor"])
            print(_row("floor: read base + LoRA", runs["lora floor"], lora_floor))
            print(_row(f"sdtune diagnose --lora (rank 32, {runs['lora'][0]['modules']} modules) --base base",
                       runs["lora"], lora_floor))
        worst = max(r["seconds"] for k in ("checkpoint", "lora") for r in runs[k])
        print(f"verdicts (checkpoint): {runs['checkpoint'][0]['triggered'] or 'none triggered'}"
              + (f"; (LoRA): {runs['lora'][0]['triggered'] or 'none triggered'}" if lora is not None else ""))
        print(f"slowest diagnosis {worst:.1f} s: {'within' if worst < LIMIT_S else 'OVER'} the {LIMIT_S:.0f} s budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
