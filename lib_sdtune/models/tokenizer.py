"""Offline CLIP BPE tokenizer for Stable Diffusion; ids identical to openai/clip-vit-large-patch14.

The vocabulary comes from a package already installed (open_clip's BPE file or ComfyUI's tokenizer
folder) or from ``SDTUNE_CLIP_VOCAB``; nothing is downloaded and open_clip/comfy are never imported.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
import unicodedata
from pathlib import Path

import torch
from transformers import CLIPTokenizer

MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# clip_l: SD1 TE / SDXL TE1 pad with EOS (49407); open_clip: SD2 TE / SDXL TE2 pad with "!" (id 0).
PAD_TOKENS = {"clip_l": EOS_TOKEN, "open_clip": "!"}
PIP_HINT = "pip install --no-deps open-clip-torch"
BPE_GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
VOCAB_FILES = ("vocab.json", "merges.txt")


class TokenizerUnavailable(RuntimeError):
    """Raised when no CLIP BPE vocabulary can be found on this machine."""


def _package_dir(name: str) -> Path | None:
    """Return a package's folder via find_spec, without importing it (its __init__ may break)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def _is_vocab_dir(path: Path) -> bool:
    """Say whether a folder holds a HF-style CLIP vocabulary (vocab.json + merges.txt)."""
    return path.is_dir() and all((path / name).is_file() for name in VOCAB_FILES)


def _open_clip_source() -> Path | None:
    """Find open_clip's shipped BPE .txt.gz, the canonical OpenAI vocabulary."""
    folder = _package_dir("open_clip")
    path = folder / BPE_GZ_NAME if folder else None
    return path if path is not None and path.is_file() else None


def _comfy_source() -> Path | None:
    """Find ComfyUI's shipped SD1 tokenizer folder."""
    folder = _package_dir("comfy")
    path = folder / "sd1_tokenizer" if folder else None
    return path if path is not None and _is_vocab_dir(path) else None


def _env_source() -> Path | None:
    """Use the folder or .txt.gz named by SDTUNE_CLIP_VOCAB, refusing a path that holds neither."""
    raw = os.environ.get("SDTUNE_CLIP_VOCAB")
    if not raw:
        return None
    path = Path(raw).expanduser()
    if _is_vocab_dir(path) or (path.is_file() and path.name.endswith(".gz")):
        return path
    raise TokenizerUnavailable(
        f"SDTUNE_CLIP_VOCAB={raw!r} is neither a folder with vocab.json + merges.txt nor a {BPE_GZ_NAME}-style file."
    )


def find_vocab_source() -> Path:
    """Return the first vocabulary source found: SDTUNE_CLIP_VOCAB (an explicit choice), open_clip, ComfyUI."""
    for finder in (_env_source, _open_clip_source, _comfy_source):
        source = finder()
        if source is not None:
            return source
    raise TokenizerUnavailable(
        "No CLIP BPE vocabulary found offline. Install one with "
        f"`{PIP_HINT}` (never with dependencies: they pull a CUDA torchvision that "
        "breaks imports), or point SDTUNE_CLIP_VOCAB at a folder with vocab.json + merges.txt."
    )


def _bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode char, exactly as OpenAI's simple_tokenizer does."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for byte in range(256):
        if byte not in keep:
            keep.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def _vocab_files_from_bpe(gz_path: Path) -> dict[str, bytes]:
    """Build vocab.json and merges.txt from OpenAI's BPE .txt.gz as its simple_tokenizer does."""
    lines = gzip.decompress(gz_path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [token + "</w>" for token in vocab]
    vocab += ["".join(merge) for merge in merges] + [BOS_TOKEN, EOS_TOKEN]
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    vocab_json = json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
    return {"vocab.json": vocab_json.encode(), "merges.txt": merges_text.encode()}


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a file via temp file + fsync + os.replace so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared by several users
        try:
            os.replace(tmp, path)
        except PermissionError:  # Windows: another process holds the (identical) file open
            if not path.is_file():
                raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def cache_dir() -> Path:
    """Return sdtune's cache root: SDTUNE_CACHE_DIR, else ~/.cache/sdtune."""
    root = os.environ.get("SDTUNE_CACHE_DIR") or Path.home() / ".cache" / "sdtune"
    return Path(root).expanduser()


def materialize_tokenizer_dir(source: Path) -> Path:
    """Write (once) a HF tokenizer folder for a vocabulary source into the cache and return it."""
    parts = [source] if source.is_file() else [source / name for name in VOCAB_FILES]
    digest = hashlib.sha256(b"".join(part.read_bytes() for part in parts)).hexdigest()
    folder = cache_dir() / "tokenizers" / f"clip-{digest[:16]}"
    if all((folder / name).is_file() for name in (*VOCAB_FILES, "tokenizer_config.json")):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        files = _vocab_files_from_bpe(source)
    else:
        files = {name: (source / name).read_bytes() for name in VOCAB_FILES}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "add_prefix_space": False,
        "errors": "replace",
    }
    files["tokenizer_config.json"] = json.dumps(config, indent=2).encode("utf-8")
    # tokenizer_config.json goes last: its presence marks a complete folder.
    for name, data in files.items():
        _atomic_write(folder / name, data)
    return folder


@functools.lru_cache(maxsize=4)
def load_clip_tokenizer(flavour: str = "clip_l") -> CLIPTokenizer:
    """Load the offline CLIP tokenizer for "clip_l" or "open_clip" (cached: treat as read-only)."""
    if flavour not in PAD_TOKENS:
        raise ValueError(f"unknown tokenizer flavour {flavour!r}; expected {sorted(PAD_TOKENS)}")
    folder = materialize_tokenizer_dir(find_vocab_source())
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH, local_files_only=True)
    # Set after loading, not as a from_pretrained kwarg: a pad token given at init becomes a
    # never-split special token, so "!" in a prompt would encode as 0 instead of OpenCLIP's 256.
    tokenizer.pad_token = PAD_TOKENS[flavour]
    if getattr(tokenizer, "fix_text", False) is None:
        # transformers 4.x slow tokenizer without ftfy falls back to a BERT BasicTokenizer that
        # splits "it's" into "it ' s" (<4.33); use OpenAI's own cleaning path (as 5.x does) instead.
        tokenizer.fix_text = functools.partial(unicodedata.normalize, "NFC")
    return tokenizer


def encode_prompts(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.LongTensor:
    """Tokenize to [B, 77] ids with BOS/EOS, truncated (EOS kept last) and padded, as SD does."""
    batch = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    return batch["input_ids"].long()
