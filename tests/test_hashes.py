"""Hashes match what A1111 and sd-scripts compute for the same file."""

import hashlib
from io import BytesIO

import pytest
import safetensors.torch as st
import torch

from lib_sdtune.io.hashes import file_hashes
from lib_sdtune.io.safetensors_io import save_safetensors


def _sd_scripts_hashes(data: bytes) -> tuple[str, str]:
    """sd-scripts' addnet_hash_safetensors and addnet_hash_legacy, written out as they are there."""
    b = BytesIO(data)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    model_hash = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    return model_hash, legacy


@pytest.mark.compat
def test_hashes_match_a1111_and_sd_scripts(tmp_path):
    tensors = {"w": torch.randn(640, 1024, generator=torch.Generator().manual_seed(1))}  # > 1 MiB file
    path = save_safetensors(tensors, tmp_path / "m.safetensors", {"ss_network_dim": "8"})
    data = path.read_bytes()
    h = file_hashes(path)
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.autov2 == h.sha256[:10]
    model_hash, legacy = _sd_scripts_hashes(st.save(tensors, metadata={"ss_network_dim": "8"}))
    assert h.sshs_model_hash == model_hash
    assert h.autov1 == legacy
    assert h.autov3 == model_hash[:12]


def test_data_hash_ignores_metadata_but_file_hash_does_not(tmp_path):
    t = {"w": torch.ones(10)}
    a = file_hashes(save_safetensors(t, tmp_path / "a.safetensors", {"k": "1"}))
    b = file_hashes(save_safetensors(t, tmp_path / "b.safetensors", {"k": "2"}))
    assert a.sshs_model_hash == b.sshs_model_hash
    assert a.sha256 != b.sha256


def test_ckpt_files_get_file_hashes_only(tmp_path):
    p = tmp_path / "m.ckpt"
    torch.save({"w": torch.ones(3)}, p)
    h = file_hashes(p).to_dict()
    assert set(h) == {"sha256", "autov1", "autov2"}
