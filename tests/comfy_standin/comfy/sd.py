"""Stand-in for comfy/sd.py (ComfyUI v0.8.0): load_lora_for_models (line 72).

ComfyUI maps the LoRA's keys to the model's weights and patches clones of MODEL and CLIP; the stand-in
patches clones with the file's tensors as they are (the real key mapping is checked by the live test).
"""


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    new_model = None
    if model is not None:
        new_model = model.clone()
        new_model.add_patches(lora, strength_model)
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        new_clip.add_patches(lora, strength_clip)
    return (new_model, new_clip)
