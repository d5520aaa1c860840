"""The faces stay thin and safe: the WebUI panel builds and answers, UI paths stay in the model folders."""

import pytest

from lib_sdtune.errors import SdtuneError
from lib_sdtune.host import HostFolders, confine, list_files, resolve_listed


@pytest.fixture()
def folders(tmp_path, tiny_checkpoints):
    ckpt_dir = tmp_path / "models" / "Stable-diffusion"
    (ckpt_dir / "sub").mkdir(parents=True)
    (ckpt_dir / "sub" / "tiny.safetensors").write_bytes(tiny_checkpoints["sd1"].read_bytes())
    (ckpt_dir / "notes.txt").write_text("not a model")
    return HostFolders.under(tmp_path / "models")


def test_model_folders_list_only_model_files(folders):
    assert list_files(folders.checkpoints) == ["sub/tiny.safetensors"]


def test_paths_from_the_ui_cannot_escape_the_model_folders(folders, tmp_path):
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    with pytest.raises(SdtuneError, match="outside the allowed"):
        confine("../../secret.safetensors", folders.checkpoints)
    with pytest.raises(SdtuneError, match="outside the allowed"):
        resolve_listed("../../secret.safetensors", folders.checkpoints)
    with pytest.raises(SdtuneError, match="no such model"):
        resolve_listed("absent.safetensors", folders.checkpoints)
    assert resolve_listed("sub/tiny.safetensors", folders.checkpoints).name == "tiny.safetensors"


@pytest.mark.compat
def test_webui_blocks_build_and_the_inspect_handler_reports(folders):
    pytest.importorskip("gradio")
    from lib_sdtune.webui.app import build_blocks
    from lib_sdtune.webui.context import UiContext
    from lib_sdtune.webui.model_panel import inspect_listed

    blocks = build_blocks(UiContext(folders))
    assert blocks is not None
    text, details = inspect_listed(folders, "sub/tiny.safetensors", True)
    assert "architecture:  sd1" in text and details["missing_keys"] == []
    text, details = inspect_listed(folders, "../../x.safetensors", False)
    assert text.startswith("Error:") and details == {}
