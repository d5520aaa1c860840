"""Training: config, planner, the trainer loop and its pieces (optimizers, schedules, noise, loss, saving)."""
