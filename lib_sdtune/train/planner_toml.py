"""A tiny TOML writer for flat training configs (str, int, float, bool, lists of those), written atomically.

The standard library reads TOML but does not write it; a train config is one flat table of sd-scripts
argument names, so this is all that is needed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import SdtuneError
from ..io.atomic import atomic_write_text


def toml_value(value: Any, key: str = "value") -> str:
    """One value in TOML syntax; `key` names it in the error for a type TOML cannot hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SdtuneError(f"config key {key} = {value}: TOML cannot hold inf/nan; give a finite number")
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, (str, os.PathLike)):
        return _string(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v, key) for v in value) + "]"
    raise SdtuneError(f"config key {key}: a {type(value).__name__} cannot be written to TOML (str, int, float, "
                      f"bool or a list of those)")


def _string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_toml(config: Mapping[str, Any], comments: Optional[Mapping[str, str]] = None, header: str = "") -> str:
    """A flat table as TOML text; None values are left out, `comments[key]` goes on the line above."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    if lines:
        lines.append("")
    for key, value in config.items():
        if value is None:
            continue
        if not key.replace("_", "").isalnum():
            raise SdtuneError(f"config key {key!r}: only letters, digits and _ are written")
        note = (comments or {}).get(key)
        if note:
            lines.append("# " + " ".join(note.split()))
        lines.append(f"{key} = {toml_value(value, key)}")
    return "\n".join(lines) + "\n"


def write_toml(path: str | os.PathLike, config: Mapping[str, Any], comments: Optional[Mapping[str, str]] = None,
               header: str = "") -> Path:
    """Write the config atomically (temp file, fsync, rename); returns the path."""
    p = Path(path)
    if p.suffix.lower() != ".toml":
        raise SdtuneError(f"{p}: a train config is written as .toml; name the output file like config.toml")
    atomic_write_text(p, to_toml(config, comments, header))
    return p
