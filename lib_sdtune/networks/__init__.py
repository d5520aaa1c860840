"""Adapter networks (LoRA/LyCORIS): kohya-compatible module names, targets and file layout."""
