"""The node pack in a real ComfyUI (opt-in: SDTUNE_COMFYUI=/path/to/ComfyUI; skipped otherwise).

Starts ComfyUI with --cpu on 127.0.0.1 and a base directory of its own (the pack symlinked into custom_nodes), then:
the stand-in's host calls have ComfyUI's signatures; the pack imports and /object_info lists every node as the
stand-in sees it; a LoRA trained by Train LoRA (cancelled with POST /interrupt, then resumed) loads with ComfyUI's
own LoRA loader without a "lora key not loaded" line; every example workflow runs through /prompt.

Environment: SDTUNE_COMFYUI_PYTHON (default $SDTUNE_COMFYUI/.venv/bin/python) must have sdtune's requirements;
SDTUNE_COMFYUI_CKPT names a full-size SD1.x checkpoint (default: one with random weights is built, 2 GB).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from comfy_standin import PACK_ROOT, comfy_host

COMFY = os.environ.get("SDTUNE_COMFYUI")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not COMFY, reason="set SDTUNE_COMFYUI to a ComfyUI checkout to run the live test")]
WORKFLOWS = PACK_ROOT / "comfy_nodes" / "workflows"
TRIGGER = "my_trigger"
BAD_LORA_LINES = ("lora key not loaded", "NOT LOADED", "ERROR lora", "SHAPE MISMATCH")

# the host calls the nodes make (and the stand-in mirrors), compared by parameter names and defaults
HOST_CALLS = (
    "comfy.utils.load_torch_file", "comfy.utils.set_progress_bar_global_hook", "comfy.utils.ProgressBar.__init__",
    "comfy.utils.ProgressBar.update_absolute", "comfy.utils.ProgressBar.update", "comfy.sd.load_lora_for_models",
    "comfy.model_management.get_torch_device", "comfy.model_management.get_total_memory",
    "comfy.model_management.intermediate_device", "comfy.model_management.soft_empty_cache",
    "comfy.model_management.unload_all_models", "comfy.model_management.interrupt_current_processing",
    "comfy.model_management.processing_interrupted", "comfy.model_management.throw_exception_if_processing_interrupted",
    "folder_paths.get_filename_list", "folder_paths.get_full_path", "folder_paths.get_full_path_or_raise",
    "folder_paths.get_folder_paths", "folder_paths.get_input_directory", "folder_paths.get_output_directory",
    "folder_paths.add_model_folder_path", "server.PromptServer.send_sync",
    "comfy_api.latest.io.Boolean.Input.__init__", "comfy_api.latest.io.Int.Input.__init__",
    "comfy_api.latest.io.Float.Input.__init__", "comfy_api.latest.io.String.Input.__init__",
    "comfy_api.latest.io.Combo.Input.__init__", "comfy_api.latest.io.Model.Input.__init__",
    "comfy_api.latest.io.Clip.Input.__init__", "comfy_api.latest.io.Image.Output.__init__",
    "comfy_api.latest.io.String.Output.__init__", "comfy_api.latest.io.Custom", "comfy_api.latest.io.Schema",
    "comfy_api.latest.io.NodeOutput.__init__", "comfy_api.latest.ui.PreviewText.__init__",
)


def resolve(name: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    else:
        raise ImportError(name)
    for attr in parts[i:]:
        obj = getattr(obj, attr)
    return obj


def parameters(obj) -> list[list[str]]:
    import inspect

    return [[p.name, repr(p.default)] for p in inspect.signature(obj).parameters.values()]


SIGNATURES = """
import json, sys
sys.path.insert(0, '.')
import utils.extra_config  # main.py imports ComfyUI's utils package first (comfy/utils.py would shadow it)
from comfy.cli_args import args
args.cpu = True
{resolve}
{parameters}
print('SIGNATURES' + json.dumps({{name: parameters(resolve(name)) for name in json.loads(sys.argv[1])}}))
"""


def comfy_python() -> str:
    default = Path(COMFY or ".") / ".venv" / "bin" / "python"
    return os.environ.get("SDTUNE_COMFYUI_PYTHON") or (str(default) if default.exists() else sys.executable)


def test_the_stand_in_has_comfys_signatures(tmp_path):
    import inspect

    script = SIGNATURES.format(resolve=inspect.getsource(resolve), parameters=inspect.getsource(parameters))
    run = subprocess.run([comfy_python(), "-c", script, json.dumps(HOST_CALLS)], cwd=COMFY, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    real = json.loads(run.stdout.split("SIGNATURES", 1)[1])
    with comfy_host(tmp_path):
        for name in HOST_CALLS:
            assert parameters(resolve(name)) == real[name], name


class Comfy:
    """A ComfyUI server of our own: its base directory, its log, and /prompt round trips."""

    def __init__(self, base: Path):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                 "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(base),
                 "--database-url", "sqlite:///:memory:"],
                cwd=COMFY, stdout=fh, stderr=subprocess.STDOUT,
                env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1"))
        deadline = time.time() + 600
        while True:
            try:
                self.object_info = self.get("/object_info")
                break
            except (urllib.error.URLError, ConnectionError):
                assert self.proc.poll() is None, self.log_text()[-3000:]
                assert time.time() < deadline, "ComfyUI did not start in 10 minutes"
                time.sleep(2)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.load(r)

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path}: HTTP {e.code}: {e.read().decode()[:3000]}") from None
        return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        answer = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        assert not answer.get("node_errors"), answer
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 1800) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            assert self.proc.poll() is None, self.log_text()[-3000:]
            time.sleep(1)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict) -> dict:
        entry = self.wait(self.queue(prompt))
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
        return entry

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_sd15(path: Path) -> None:
    """A full-size SD1.5 checkpoint (ldm layout, fp16) with random weights, which ComfyUI detects as SD15."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from lib_sdtune.models import to_ldm

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=512)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      projection_dim=768))
    sd = {**to_ldm.unet_to_ldm(unet.state_dict()), **to_ldm.vae_to_ldm(vae.state_dict()),
          **to_ldm.clip_to_ldm(te.state_dict(), "cond_stage_model.transformer.")}
    sd = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(path))


def _finetune_of(base: Path, path: Path) -> None:
    """The base with its cross-attention keys and TE queries moved: a 'fine-tune' to merge, repair, extract."""
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(1)
    sd = load_file(str(base))
    for k, v in sd.items():
        if v.is_floating_point() and ("attn2.to_k" in k or ("cond_stage_model" in k and "q_proj.weight" in k)):
            sd[k] = (v.float() + 0.02 * torch.randn(v.shape, generator=gen)).half()
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_live")
    ckpts, loras = base / "models" / "checkpoints", base / "models" / "loras"
    ckpts.mkdir(parents=True)
    loras.mkdir(parents=True)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "sdtune").symlink_to(PACK_ROOT)
    given = os.environ.get("SDTUNE_COMFYUI_CKPT")
    if given:
        (ckpts / "sd15_base.safetensors").symlink_to(Path(given).resolve())
    else:
        _random_sd15(ckpts / "sd15_base.safetensors")
    _finetune_of(ckpts / "sd15_base.safetensors", ckpts / "sd15_finetune.safetensors")
    folder = base / "input" / "my_dataset" / f"1_{TRIGGER}"
    folder.mkdir(parents=True)
    from PIL import Image

    for i, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"{TRIGGER}, square, watermark", encoding="utf-8")
    try:
        from test_tags_wd14 import write_model

        write_model(base / "models" / "wd14_tagger" / "wd-swinv2-tagger-v3")
    except ImportError:  # no onnx here: the dataset workflow then runs without its WD14 node
        pass
    server = Comfy(base)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)  # gigabytes of checkpoints


def _workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def test_the_pack_loads_and_comfy_lists_every_node_as_the_stand_in_does(comfy, tmp_path):
    log = comfy.log_text()
    assert "IMPORT FAILED" not in "".join(line for line in log.splitlines() if "sdtune" in line), log[-3000:]
    assert "Error while calling comfy_entrypoint" not in log
    with comfy_host(tmp_path) as host:
        for node_id in host.nodes:
            info = comfy.object_info[node_id]
            schema = host.schema(node_id)
            listed = [*info["input_order"].get("required", []), *info["input_order"].get("optional", [])]
            assert listed == [i.id for i in schema.inputs], node_id
            assert info["output"] == [o.io_type for o in schema.outputs], node_id
            assert info["category"] == schema.category and info["python_module"].startswith("custom_nodes.")


def test_train_cancel_resume_and_the_lora_in_comfys_own_loader(comfy):
    from lib_sdtune.networks.lora_info import inspect_lora

    prompt = _workflow("train")
    prompt["4"]["inputs"].update(lora_name="live", rank=4, alpha=2.0, epochs=3, resolution=64, text_encoder="on")
    prompt["8"]["inputs"].update(width=64, height=64)
    prompt["9"]["inputs"].update(steps=1)
    run = comfy.base / "models" / "loras" / "sdtune" / "live"
    prompt_id = comfy.queue(prompt)
    deadline = time.time() + 1200
    while not (run / "live-config.json").exists():  # written just before the first step
        assert time.time() < deadline and comfy.proc.poll() is None, comfy.log_text()[-3000:]
        time.sleep(0.5)
    comfy.post("/interrupt", {})
    entry = comfy.wait(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]]
    assert (run / "live-state" / "train_state.json").is_file() and not (run / "live.safetensors").exists()

    prompt["4"]["inputs"]["resume"] = True
    entry = comfy.run(prompt)
    assert (run / "live.safetensors").is_file() and inspect_lora(run / "live.safetensors").te_modules == 72
    assert entry["outputs"]["4"]["text"][0].startswith("wrote sdtune/live/live.safetensors")
    assert entry["outputs"]["11"]["images"]  # sampled with MODEL and CLIP carrying the new LoRA
    shutil.copy(run / "live.safetensors", comfy.base / "models" / "loras" / "my_lora.safetensors")
    with_loader = {k: v for k, v in prompt.items() if k in ("1", "6", "7", "8", "9", "10", "11")}
    with_loader["12"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                                "lora_name": "my_lora.safetensors",
                                                                "strength_model": 1.0, "strength_clip": 1.0}}
    for node, socket_ in (("6", "clip"), ("7", "clip")):
        with_loader[node]["inputs"][socket_] = ["12", 1]
    with_loader["9"]["inputs"]["model"] = ["12", 0]
    with_loader["11"]["inputs"]["filename_prefix"] = "lora_loader"
    comfy.run(with_loader)
    bad = [line for line in comfy.log_text().splitlines() if any(b in line for b in BAD_LORA_LINES)]
    assert not bad, bad[:20]


@pytest.mark.parametrize("name", ["dataset", "merge", "repair", "lora_tools"])
def test_example_workflow_runs(comfy, name):
    if name in ("repair", "lora_tools") and not (comfy.base / "models" / "loras" / "my_lora.safetensors").exists():
        pytest.skip("needs the LoRA the training test writes")
    prompt = _workflow(name)
    if name == "dataset" and not (comfy.base / "models" / "wd14_tagger").exists():
        prompt["3"]["inputs"]["dataset"] = ["1", 0]
        del prompt["2"]
    entry = comfy.run(prompt)
    for key, node in prompt.items():
        if node["class_type"].startswith("Sdtune"):
            assert entry["outputs"][key]["text"][0], (key, node["class_type"])
    if name == "dataset":
        caption = (comfy.base / "input" / "my_dataset" / f"1_{TRIGGER}" / "0.txt").read_text(encoding="utf-8")
        assert caption.startswith(TRIGGER) and "watermark" not in caption
