"""Last-frame chunk chainer: plans 4k+1 chunks over long clips, chains generation through hand-off frames,
controls colour drift anchored to the edited first frame, and measures seams. Torch-only except node.py."""
