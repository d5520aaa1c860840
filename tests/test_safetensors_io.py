"""The streaming safetensors writer: same bytes as the reference library, atomic, and honest errors."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from safetensors import safe_open

from lib_sdtune.errors import SdtuneError
from lib_sdtune.io.atomic import atomic_write
from lib_sdtune.io.safetensors_io import (
    SafetensorsFile,
    SafetensorsWriter,
    read_header,
    save_safetensors,
    st_dtype_name,
    write_metadata,
)

ROOT = Path(__file__).resolve().parents[1]


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 5, generator=g).half(),
        "a.weight": torch.randn(4, 4, generator=g),
        "ids": torch.arange(7).reshape(1, 7),
        "bf": torch.randn(6, generator=g).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


@pytest.mark.compat
def test_written_file_is_byte_identical_to_safetensors_save(tmp_path):
    t = _tensors()
    ours = save_safetensors(t, tmp_path / "ours.safetensors", {"ss_network_dim": "4"})
    ref = st.save(t, metadata={"ss_network_dim": "4"})
    assert ours.read_bytes() == ref


def test_tensors_written_in_any_order_give_the_same_file(tmp_path):
    t = _tensors()
    specs = {k: (st_dtype_name(v.dtype), tuple(v.shape)) for k, v in t.items()}
    with SafetensorsWriter(tmp_path / "rev.safetensors", specs, {"x": "y"}) as w:
        for name in reversed(list(t)):
            w.write(name, t[name])
    save_safetensors(t, tmp_path / "fwd.safetensors", {"x": "y"})
    assert (tmp_path / "rev.safetensors").read_bytes() == (tmp_path / "fwd.safetensors").read_bytes()
    with safe_open(str(tmp_path / "rev.safetensors"), "pt") as f:
        for k, v in t.items():
            assert torch.equal(f.get_tensor(k), v)


def test_reader_gives_shapes_dtypes_metadata_and_tensors_by_name(tmp_path):
    t = _tensors()
    path = save_safetensors(t, tmp_path / "m.safetensors", {"modelspec.title": "tiny"})
    sf = SafetensorsFile(path)
    assert sf.metadata == {"modelspec.title": "tiny"}
    assert sf.shape("b.weight") == (3, 5) and sf.dtype("bf") == torch.bfloat16
    assert torch.equal(sf.get_tensor("ids"), t["ids"])


def test_missing_tensor_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old contents")
    specs = {"a": ("F32", (2,)), "b": ("F32", (2,))}
    with pytest.raises(SdtuneError, match="never written"):
        with SafetensorsWriter(target, specs) as w:
            w.write("a", torch.zeros(2))
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_wrong_shape_or_undeclared_name_is_refused_with_the_name(tmp_path):
    with pytest.raises(SdtuneError, match="'a' is F32\\[3\\], declared F32\\[2\\]"):
        with SafetensorsWriter(tmp_path / "x.safetensors", {"a": ("F32", (2,))}) as w:
            w.write("a", torch.zeros(3))
    with pytest.raises(SdtuneError, match="'zzz' was not declared"):
        with SafetensorsWriter(tmp_path / "x.safetensors", {"a": ("F32", (2,))}) as w:
            w.write("zzz", torch.zeros(2))
    assert not (tmp_path / "x.safetensors").exists()


def test_exception_inside_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as fh:
            fh.write("v2 partial")
            raise RuntimeError("boom")
    assert target.read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.compat
def test_killed_write_leaves_the_old_file_intact(tmp_path):
    """SIGKILL in the middle of a 64 MB write: the target keeps its old bytes; the next write cleans up."""
    target = tmp_path / "big.safetensors"
    old = save_safetensors({"w": torch.ones(4)}, target)
    old_bytes = old.read_bytes()
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        from lib_sdtune.io.safetensors_io import SafetensorsWriter
        specs = {{f"t{{i}}": ("F32", (1024, 1024)) for i in range(16)}}
        with SafetensorsWriter({str(target)!r}, specs) as w:
            for i in range(16):
                w.write(f"t{{i}}", torch.full((1024, 1024), float(i)))
                if i == 3:
                    print("HALFWAY", flush=True)
                    time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "HALFWAY"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_bytes() == old_bytes
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed writer's temp file should still be there before cleanup"
    save_safetensors({"w": torch.zeros(4)}, target)  # next write to the same target removes dead temps
    assert [p.name for p in tmp_path.iterdir()] == ["big.safetensors"]
    assert torch.equal(st.load_file(str(target))["w"], torch.zeros(4))


def test_garbage_file_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(SdtuneError, match="broken.safetensors: not a safetensors file"):
        read_header(bad)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(SdtuneError, match="short.safetensors"):
        read_header(short)


def test_write_metadata_rewrites_header_and_keeps_tensors(tmp_path):
    t = _tensors()
    src = save_safetensors(t, tmp_path / "m.safetensors", {"a": "1"})
    out = write_metadata(src, {"ss_output_name": "renamed"}, tmp_path / "m2.safetensors")
    assert SafetensorsFile(out).metadata == {"ss_output_name": "renamed"}
    loaded = st.load_file(str(out))
    assert all(torch.equal(loaded[k], v) for k, v in t.items())
    assert SafetensorsFile(src).metadata == {"a": "1"}  # the input is untouched


def test_timestamps_do_not_matter_for_content(tmp_path):
    t = _tensors()
    a = save_safetensors(t, tmp_path / "a.safetensors").read_bytes()
    time.sleep(0.01)
    b = save_safetensors(t, tmp_path / "b.safetensors").read_bytes()
    assert a == b
