"""Original single-file checkpoints -> diffusers/transformers modules, fully offline."""
