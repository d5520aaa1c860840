"""Opening model files: safetensors lazily, pickles only as plain tensors, anything else refused."""

import pytest
import torch

from lib_sdtune.errors import SdtuneError, UnsafeFileError
from lib_sdtune.io.checkpoint import open_checkpoint, source_from_shapes
from lib_sdtune.io.safetensors_io import save_safetensors


class Payload:
    """A pickled object that would run code on load (weights_only must refuse it)."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_safetensors_source_answers_shapes_without_loading(tmp_path):
    path = save_safetensors({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16)},
                            tmp_path / "m.safetensors", {"k": "v"})
    src = open_checkpoint(path)
    assert src.shapes() == {"a": (2, 3), "b": (4,)}
    assert src.dtype("b") == torch.float16 and src.metadata == {"k": "v"}
    assert torch.equal(src["a"], torch.ones(2, 3))


def test_plain_tensor_ckpt_loads_and_state_dict_is_unwrapped(tmp_path):
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "global_step": 10}, p)
    src = open_checkpoint(p)
    assert list(src) == ["a"] and torch.equal(src["a"], torch.ones(2))


def test_pickle_with_code_is_refused_with_a_message_naming_the_file(tmp_path, capsys):
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "x": Payload()}, p)
    with pytest.raises(UnsafeFileError, match="evil.ckpt: refused to load"):
        open_checkpoint(p)
    assert "pwned" not in capsys.readouterr().out


def test_unknown_extension_and_missing_file_are_refused(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"GGUF")
    with pytest.raises(SdtuneError, match="unsupported file type .gguf"):
        open_checkpoint(p)
    with pytest.raises(SdtuneError, match="no such file"):
        open_checkpoint(tmp_path / "absent.safetensors")


def test_meta_source_has_shapes_and_no_memory():
    src = source_from_shapes({"w": (4096, 4096)})
    t = src["w"]
    assert t.device.type == "meta" and tuple(t.shape) == (4096, 4096)
