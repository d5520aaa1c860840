"""WD14 tagger model folders: `model.onnx` + `selected_tags.csv` (SmilingWolf v1.4/v2/v3 layouts).

Finding them in configured folders, reading the label file, opening the ONNX session (onnxruntime is
imported only here, only when a tagger is used) and, on an explicit call naming a repo id, downloading one.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import SdtuneError
from .text import underscores_to_spaces

MODEL_FILE = "model.onnx"
LABEL_FILE = "selected_tags.csv"
RATING, GENERAL, CHARACTER = 9, 0, 4
# Where taggers usually live below a WebUI `models/` folder (picobyte/toriato extension, ours)
TAGGER_SUBFOLDERS = ("interrogators", "wd14_tagger", "taggers")
DEFAULT_INPUT_SIZE = 448  # every SmilingWolf v2/v3 model; used only when the ONNX shape is dynamic
SUGGESTED_REPOS = ("SmilingWolf/wd-swinv2-tagger-v3", "SmilingWolf/wd-vit-tagger-v3",
                   "SmilingWolf/wd-convnext-tagger-v3", "SmilingWolf/wd-v1-4-moat-tagger-v2")


@dataclass(frozen=True)
class Wd14Labels:
    """Tag names (row i = output column i) and the row indices of each category."""

    names: tuple[str, ...]
    rating: tuple[int, ...]
    general: tuple[int, ...]
    character: tuple[int, ...]


def load_labels(path: str | os.PathLike, replace_underscores: bool = True) -> Wd14Labels:
    """Read `selected_tags.csv` (tag_id,name,category,count); names get `_` -> space except kaomojis."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SdtuneError(f"{path}: cannot read the tagger's label file ({e})") from e
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise SdtuneError(f"{path}: expected the columns tag_id,name,category,count of a WD14 selected_tags.csv")
    names, cats = [], []
    for i, row in enumerate(rows):
        try:
            cats.append(int(row["category"]))
        except (TypeError, ValueError) as e:
            raise SdtuneError(f"{path}: row {i + 2} has category {row['category']!r}, not a number") from e
        name = row["name"] or ""
        names.append(underscores_to_spaces(name) if replace_underscores else name)
    pick = lambda c: tuple(i for i, x in enumerate(cats) if x == c)  # noqa: E731
    return Wd14Labels(tuple(names), pick(RATING), pick(GENERAL), pick(CHARACTER))


def is_model_dir(folder: Path) -> bool:
    """True when a folder holds both tagger files."""
    return (folder / MODEL_FILE).is_file() and (folder / LABEL_FILE).is_file()


def find_models(roots: Iterable[str | os.PathLike], max_depth: int = 4) -> list[Path]:
    """Tagger folders under the roots (each root, its TAGGER_SUBFOLDERS, and below), sorted, no repeats."""
    found: dict[Path, None] = {}

    def walk(folder: Path, depth: int) -> None:
        if is_model_dir(folder):
            found.setdefault(folder.resolve())
        if depth >= max_depth:
            return
        try:
            subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for sub in subs:
            walk(sub, depth + 1)

    for root in roots:
        root = Path(root)
        if root.is_dir():
            walk(root, 0)
    return sorted(found)


def model_roots(configured: Sequence[str | os.PathLike] = (),
                models_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders to search: configured ones, `$SDTUNE_TAGGER_DIR`, and the host's `models/<tagger folder>`."""
    roots = [Path(p) for p in configured]
    if os.environ.get("SDTUNE_TAGGER_DIR"):
        roots.append(Path(os.environ["SDTUNE_TAGGER_DIR"]))
    if models_dir is not None:
        roots += [Path(models_dir) / sub for sub in TAGGER_SUBFOLDERS]
    return roots


def _onnxruntime():
    """Import onnxruntime, or say which package to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise SdtuneError(f"the WD14 tagger needs the onnxruntime package ({e}). Install it into this Python: "
                          f"pip install onnxruntime (or onnxruntime-gpu for CUDA; keep only one of the two)") from e
    return onnxruntime


def providers_for(device: str) -> list[str]:
    """onnxruntime execution providers for "cpu", "cuda" or "auto" (CUDA when available, else CPU)."""
    ort = _onnxruntime()
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise SdtuneError(f"device cuda: onnxruntime here offers only {', '.join(available)}. Install "
                          f"onnxruntime-gpu (in place of onnxruntime) or use --device cpu")
    return ["CPUExecutionProvider"]


@dataclass
class Wd14Model:
    """An opened tagger: ONNX session, labels, input size and the batch size the graph allows."""

    folder: Path
    session: object
    labels: Wd14Labels
    input_name: str
    input_size: int
    fixed_batch: int | None  # v2.0 exports fix the batch to 1; v3 has a dynamic batch

    def predict(self, batch):
        """Scores [N, n_tags] for an NHWC float32 BGR batch."""
        return self.session.run(None, {self.input_name: batch})[0]


def open_model(folder: str | os.PathLike, device: str = "cpu", replace_underscores: bool = True,
               threads: int = 0) -> Wd14Model:
    """Open a tagger folder; the input size comes from the ONNX input shape [N, H, W, 3]."""
    folder = Path(folder)
    if not is_model_dir(folder):
        raise SdtuneError(f"{folder}: not a WD14 tagger folder; it needs {MODEL_FILE} and {LABEL_FILE} (for example "
                          f"from https://huggingface.co/{SUGGESTED_REPOS[0]})")
    labels = load_labels(folder / LABEL_FILE, replace_underscores)
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(folder / MODEL_FILE), sess_options=opts, providers=providers_for(device))
    except Exception as e:  # onnxruntime raises its own exception types
        raise SdtuneError(f"{folder / MODEL_FILE}: onnxruntime could not load it ({e}). v3 taggers need "
                          f"onnxruntime >= 1.17") from e
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4 or shape[3] not in (3, "3"):
        raise SdtuneError(f"{folder / MODEL_FILE}: input shape {shape} is not NHWC [N, H, W, 3] as WD14 taggers have")
    size = shape[1] if isinstance(shape[1], int) else DEFAULT_INPUT_SIZE
    n_out = out.shape[-1] if out.shape and isinstance(out.shape[-1], int) else None
    if n_out is not None and n_out != len(labels.names):
        raise SdtuneError(f"{folder}: the model scores {n_out} tags but {LABEL_FILE} lists {len(labels.names)}; "
                          f"the two files come from different models")
    fixed = shape[0] if isinstance(shape[0], int) else None
    return Wd14Model(folder, session, labels, inp.name, int(size), fixed)


def download_model(repo_id: str, dest_root: str | os.PathLike, revision: str | None = None) -> Path:
    """Download `model.onnx` + `selected_tags.csv` of a Hugging Face repo into dest_root/<repo name>.

    Only ever called on an explicit user action naming `repo_id` (never by a default or a test).
    """
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError as e:
        raise SdtuneError(f"downloading {repo_id} needs huggingface_hub (pip install huggingface_hub)") from e
    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise SdtuneError(f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE=1). Run the download with "
                          f"HF_HUB_OFFLINE=0, or put {MODEL_FILE} and {LABEL_FILE} in a folder yourself")
    dest = Path(dest_root) / repo_id.split("/")[-1]
    for name in (LABEL_FILE, MODEL_FILE):
        try:
            hf_hub_download(repo_id, name, revision=revision, local_dir=dest)
        except Exception as e:  # hub errors (network, 404, auth) are many types
            raise SdtuneError(f"downloading {name} of {repo_id} failed: {e}") from e
    return dest
