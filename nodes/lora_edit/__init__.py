"""LoRA-Edit (SEED_SPEC section 5): mask-aware per-video LoRA trainer and the matching I2V conditioning."""
