"""Diffusers-format model folders load offline too, and `model info` describes them."""

import json

import pytest
import torch

from lib_sdtune.demo.tiny_models import build_tiny_components
from lib_sdtune.errors import SdtuneError
from lib_sdtune.models.inspect import inspect_model
from lib_sdtune.models.loader import load_checkpoint, noise_scheduler_config

PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2-v": "StableDiffusionPipeline",
             "sdxl": "StableDiffusionXLPipeline"}


def write_folder(arch: str, root):
    """A pipeline folder as `save_pretrained` writes it (safetensors weights + JSON configs)."""
    from diffusers import DDPMScheduler

    modules = build_tiny_components(arch, seed=0)
    index = {"_class_name": PIPELINES[arch], "_diffusers_version": "0.31.0"}
    for name, module in modules.items():
        module.save_pretrained(root / name, safe_serialization=True)
        lib = "transformers" if name.startswith("text_encoder") else "diffusers"
        index[name] = [lib, type(module).__name__]
    pred = "v_prediction" if arch == "sd2-v" else "epsilon"
    DDPMScheduler(**noise_scheduler_config(pred)).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(index))
    return modules


@pytest.mark.compat
@pytest.mark.parametrize("arch", list(PIPELINES))
def test_diffusers_folder_loads_offline_with_identical_weights(tmp_path, arch):
    original = write_folder(arch, tmp_path)
    model = load_checkpoint(tmp_path)
    assert model.arch.architecture == arch
    assert model.report.missing_keys == [] and model.report.unexpected_keys == []
    for name, module in original.items():
        a, b = module.state_dict(), model.modules[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_info_on_a_folder_counts_components_and_reads_the_scheduler(tmp_path):
    original = write_folder("sd2-v", tmp_path)
    info = inspect_model(tmp_path, load=True)
    assert info.architecture == "sd2-v" and info.prediction_source.endswith("scheduler_config.json")
    assert info.components == {k: sum(p.numel() for p in m.parameters()) for k, m in original.items()}
    assert info.missing_keys == [] and info.unexpected_keys == []


def test_a_folder_without_model_index_is_refused_clearly(tmp_path):
    with pytest.raises(SdtuneError, match="a folder, not a model file"):
        inspect_model(tmp_path)
