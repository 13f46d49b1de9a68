"""The small Wan world: a procedural video world with ground-truth edits, and the small Wan VAE + I2V DiT trained on it."""
