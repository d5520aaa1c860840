"""A1111/Forge installer: runs at every WebUI launch, so it must be a fast no-op when satisfied.

It installs only sdtune's own missing requirements, with the host's packages (torch, gradio,
transformers, numpy, ...) pinned at their installed versions through a pip constraints file, so
pip can never upgrade or downgrade what the WebUI depends on. A host package that is too old is
reported, not replaced. Also usable outside the WebUI: `python install.py`.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Packages the host owns: never installed or changed by sdtune, only checked.
HOST_OWNED = {
    "torch", "torchvision", "torchaudio", "xformers", "gradio", "gradio-client", "transformers", "tokenizers",
    "numpy", "huggingface-hub", "accelerate", "safetensors", "pillow", "fastapi", "pydantic", "starlette",
    "pyyaml", "packaging", "open-clip-torch", "protobuf",
}
VOCAB_PACKAGE = "open-clip-torch"  # ships the CLIP BPE vocabulary; installed without its torchvision deps


def _canon(name: str) -> str:
    return name.lower().replace("_", "-")


def _version_of(name: str):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def read_requirements(path: Path = HERE / "requirements.txt") -> list[str]:
    """Requirement lines of requirements.txt (comments and blanks dropped)."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def plan(requirements: list[str], version_of=_version_of) -> tuple[list[str], list[str]]:
    """Split requirements into (to install, warnings) given the installed versions."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always vendors it
        from pip._vendor.packaging.requirements import Requirement

    to_install, warnings = [], []
    for line in requirements:
        req = Requirement(line)
        have = version_of(req.name)
        if have is not None and (not req.specifier or req.specifier.contains(have, prereleases=True)):
            continue
        if _canon(req.name) in HOST_OWNED:
            found = f"found {have}" if have else "not installed"
            warnings.append(f"sdtune needs {line} ({found}); it is the host's package, so sdtune leaves it alone. "
                            f"Update the WebUI if sdtune features fail.")
        else:
            to_install.append(line)
    return to_install, warnings


def host_constraints(version_of=_version_of) -> str:
    """A pip constraints file pinning every installed host-owned package to its current version."""
    pins = []
    for name in sorted(HOST_OWNED):
        have = version_of(name)
        if have:
            pins.append(f"{name}=={have}")
    return "\n".join(pins) + "\n"


def vocabulary_available() -> bool:
    """True when a CLIP vocabulary source is installed (open_clip, or ComfyUI's tokenizer files)."""
    for mod in ("open_clip", "comfy"):
        try:
            if importlib.util.find_spec(mod) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def _pip(args: str, desc: str) -> None:
    try:
        import launch  # A1111/Forge: honours --skip-install, INDEX_URL and the WebUI's python

        launch.run_pip(args, desc)
    except ImportError:
        print(f"sdtune: installing {desc}")
        subprocess.run([sys.executable, "-m", "pip", *shlex.split(args)], check=True)


def main() -> int:
    to_install, warnings = plan(read_requirements())
    for w in warnings:
        print(f"sdtune: warning: {w}")
    if to_install:
        fd, constraints = tempfile.mkstemp(prefix="sdtune-host-pins-", suffix=".txt")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(host_constraints())
            quoted = " ".join(shlex.quote(r) for r in to_install)
            _pip(f"install {quoted} -c {shlex.quote(constraints)}", "sdtune requirements: " + ", ".join(to_install))
        finally:
            os.unlink(constraints)
    if not vocabulary_available():
        _pip(f"install --no-deps {VOCAB_PACKAGE}", "CLIP vocabulary for sdtune (open-clip-torch, no deps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
