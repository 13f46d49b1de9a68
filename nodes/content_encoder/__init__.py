"""GenProp content encoder: SCE + MPD on a Wan DiT (model, attach, losses, data, train, files; node.py is the glue)."""
