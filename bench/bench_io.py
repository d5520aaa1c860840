"""I/O benchmark: sdtune's streaming safetensors copy vs the load-everything baseline, in one run.

Prints wall time and peak RSS of each, and the ratio to the baseline measured in the same run.
Each variant runs in its own subprocess so peak RSS is its own. Usage:
    python bench/bench_io.py [--size-mb 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (baseline, sdtune) pairs; each sdtune figure is divided by its own baseline from the same run
PAIRS = [
    # what naive merge/convert scripts do: load the whole file, save it again (made durable with fsync,
    # as sdtune's atomic writer is, so both pay the same disk flush)
    ("baseline: safetensors load_file + save_file + fsync", """
import os, safetensors.torch as st
st.save_file(st.load_file(SRC), DST)
fd = os.open(DST, os.O_RDONLY); os.fsync(fd); os.close(fd)
""",
     "sdtune: stream tensor by tensor (SafetensorsFile -> SafetensorsWriter)", """
from lib_sdtune.io.safetensors_io import SafetensorsFile, SafetensorsWriter
src = SafetensorsFile(SRC)
with SafetensorsWriter(DST, {k: (i.dtype, i.shape) for k, i in src.tensors.items()}, src.metadata) as w:
    for name in w.order:
        w.write(name, src.get_tensor(name))
"""),
    # reading one named tensor (what a merge or a LoRA bake does per step)
    ("baseline: safetensors load_file, take one tensor", """
import safetensors.torch as st
t = st.load_file(SRC)["model.diffusion_model.block.5.weight"]
""",
     "sdtune: SafetensorsFile.get_tensor(name)", """
from lib_sdtune.io.safetensors_io import SafetensorsFile
t = SafetensorsFile(SRC).get_tensor("model.diffusion_model.block.5.weight")
"""),
]


def make_source(path: Path, size_mb: int) -> None:
    import torch

    from lib_sdtune.io.safetensors_io import SafetensorsWriter

    n = max(1, size_mb // 8)  # 8 MiB fp16 tensors, like UNet conv weights
    specs = {f"model.diffusion_model.block.{i}.weight": ("F16", (2048, 2048)) for i in range(n)}
    with SafetensorsWriter(path, specs, {"bench": "io"}) as w:
        for i, name in enumerate(w.order):
            w.write(name, torch.full((2048, 2048), float(i % 7), dtype=torch.float16))


def run_variant(code: str, src: Path, dst: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one variant in a fresh interpreter (imports excluded from the time)."""
    script = (f"import sys, time, resource, json; sys.path.insert(0, {str(ROOT)!r})\n"
              "import torch, safetensors.torch, lib_sdtune.io.safetensors_io\n"
              f"SRC, DST = {str(src)!r}, {str(dst)!r}\n"
              "_t0 = time.perf_counter()\n" + code +
              "\nprint(json.dumps([time.perf_counter() - _t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))\n")
    dst.unlink(missing_ok=True)  # every variant writes a new file (overwriting in place is faster on some disks)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seconds, rss_kb = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, rss_kb / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("SDTUNE_BENCH_DIR")) as tmp:
        src, dst = Path(tmp) / "src.safetensors", Path(tmp) / "dst.safetensors"
        make_source(src, args.size_mb)
        print(f"source: {src.stat().st_size / 2**20:.0f} MiB, {args.size_mb // 8} tensors; best of {args.repeat}")
        print(f"{'variant':<72} {'time s':>8} {'peak RSS MiB':>13} {'time ratio':>11} {'RSS ratio':>10}")
        for base_name, base_code, name, code in PAIRS:
            runs: dict[str, list[tuple[float, float]]] = {base_name: [], name: []}
            for _ in range(args.repeat):  # interleaved, so disk and load drift hit both alike
                for label, snippet in ((base_name, base_code), (name, code)):
                    runs[label].append(run_variant(snippet, src, dst))
            best = [(label, min(r[0] for r in rs), min(r[1] for r in rs)) for label, rs in runs.items()]
            (_, bt, brss) = best[0]
            for label, t, rss in best:
                print(f"{label:<72} {t:>8.3f} {rss:>13.0f} {t / bt:>10.2f}x {rss / brss:>9.2f}x")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
