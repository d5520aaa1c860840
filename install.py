"""A1111/Forge installer: runs at every WebUI launch, so it must be a fast no-op when satisfied.

It installs only requirements that are missing, with every installed package (torch, gradio,
transformers, numpy, ...) pinned at its installed version through a pip constraints file, so pip
can never upgrade or downgrade what the WebUI depends on. An installed package that is too old is
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
VOCAB_PACKAGE = "open-clip-torch"  # ships the CLIP BPE vocabulary; installed without its torchvision deps

# Measured incompatibilities that pip cannot see (diffusers does not declare them): when the host
# has the package on the left in the version range given, diffusers must stay below the cap.
#   transformers < 4.37: diffusers >= 0.32 pipelines import SiglipImageProcessor (A1111 pins 4.30.2)
#   transformers < 4.48: diffusers >= 0.37 models import Dinov2WithRegistersConfig
#   peft < 0.15 / < 0.17: diffusers >= 0.34 / >= 0.35 refuse to import (Forge pins peft 0.13.2)
COMPAT_CAPS = [
    ("transformers", "<4.37", "diffusers<0.32"),
    ("transformers", "<4.48", "diffusers<0.37"),
    ("peft", "<0.15", "diffusers<0.34"),
    ("peft", "<0.17", "diffusers<0.35"),
]


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# distributions that provide the same import as a requirement: installing the plain one beside them would
# replace the host's GPU build (e.g. onnxruntime over onnxruntime-gpu silently loses CUDA)
PROVIDED_BY = {"onnxruntime": ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                               "onnxruntime-rocm", "onnxruntime-silicon", "onnxruntime-training")}


def _installed_as(name: str, installed: dict[str, str]):
    """The installed version of `name`, or of a distribution that provides it (see PROVIDED_BY)."""
    for candidate in (name, *PROVIDED_BY.get(name, ())):
        if candidate in installed:
            return installed[candidate]
    return None


def installed_versions() -> dict[str, str]:
    """Every installed distribution (canonical name -> version)."""
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(_canon(name), dist.version)
    return out


def read_requirements(path: Path = HERE / "requirements.txt") -> list[str]:
    """Requirement lines of requirements.txt (comments and blanks dropped)."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pip always vendors it
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.specifiers import SpecifierSet
    return Requirement, SpecifierSet


def plan(requirements: list[str], installed: dict[str, str]) -> tuple[list[str], list[str]]:
    """(requirements to install, warnings): only missing packages are installed; an installed one
    that is too old is reported, never replaced, because the host or another extension may rely on it."""
    Requirement, _ = _packaging()
    to_install, warnings = [], []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue  # e.g. tomli, needed only below Python 3.11
        have = _installed_as(_canon(req.name), installed)
        if have is None:
            to_install.append(line)
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            warnings.append(f"sdtune needs {line} but {req.name} {have} is installed; sdtune leaves it as it is "
                            f"(the WebUI or another extension may depend on it). Some features may fail.")
    return to_install, warnings


def constraints(installed: dict[str, str]) -> str:
    """A pip constraints file: every installed package pinned as it is, plus the measured caps."""
    _, SpecifierSet = _packaging()
    lines = [f"{name}=={version}" for name, version in sorted(installed.items())]
    for package, when, cap in COMPAT_CAPS:
        have = installed.get(package)
        if have is not None and SpecifierSet(when).contains(have, prereleases=True):
            lines.append(cap)
    return "\n".join(lines) + "\n"


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
    installed = installed_versions()
    to_install, warnings = plan(read_requirements(), installed)
    for w in warnings:
        print(f"sdtune: warning: {w}")
    if to_install:
        fd, path = tempfile.mkstemp(prefix="sdtune-host-pins-", suffix=".txt")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(constraints(installed))
            quoted = " ".join(shlex.quote(r) for r in to_install)
            _pip(f"install {quoted} -c {shlex.quote(path)}", "sdtune requirements: " + ", ".join(to_install))
        finally:
            os.unlink(path)
    if not vocabulary_available():
        _pip(f"install --no-deps {VOCAB_PACKAGE}", "CLIP vocabulary for sdtune (open-clip-torch, no deps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
