"""sdtune core: LoRA/LyCORIS training, merging, over-fit repair and tag tools for Stable Diffusion.

Nothing here imports a host (A1111 `modules`, ComfyUI `comfy`) or gradio; faces do that.
"""

__version__ = "0.1.0"
