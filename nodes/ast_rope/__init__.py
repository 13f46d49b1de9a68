"""AST-RoPE (FreeProp, SEED_SPEC 3.3): remapped 3-D RoPE positions for the Wan DiT, alpha sources (manual,
motion heuristic, learned predictor) and the predictor trainer. Torch-only except node.py."""
