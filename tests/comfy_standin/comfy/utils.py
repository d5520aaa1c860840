"""Stand-in for comfy/utils.py (ComfyUI v0.8.0): load_torch_file (line 58) and ProgressBar (1095-1119).

ProgressBar calls the global hook, which ComfyUI's server installs (main.py hijack_progress); that hook
raises InterruptProcessingException when Cancel was pressed. The stand-in host installs the same kind.
"""

import safetensors.torch
import torch

PROGRESS_BAR_HOOK = None


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    device = device or torch.device("cpu")
    if not ckpt.lower().endswith((".safetensors", ".sft")):
        raise ValueError(f"the stand-in reads safetensors only: {ckpt}")
    sd = safetensors.torch.load_file(ckpt, device=device.type)
    if return_metadata:
        with safetensors.safe_open(ckpt, framework="pt") as f:
            return sd, f.metadata()
    return sd
