"""Stand-in for ComfyUI's `comfy` package: only the modules and calls sdtune's nodes use."""
