"""Frames, masks and latents: conventions, 4k+1 rules, resizing, colour matching, previews, video I/O.

Torch-only (plus numpy/OpenCV/PyAV); every other room builds on these."""
