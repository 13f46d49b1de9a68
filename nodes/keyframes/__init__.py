"""Keyframe-guided propagation (VIVID's KIVE loop, SEED_SPEC 7.2): edited keyframes at any frame, spans between
them generated from both ends where the engine allows it, a content-hashed span cache for cheap re-edits."""
