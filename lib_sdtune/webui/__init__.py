"""Gradio blocks shared by the A1111/Forge tab and the standalone app (gradio 3.41 to 6)."""
