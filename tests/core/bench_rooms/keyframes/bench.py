"""A room's bench module as the benchmark discovers it: one row that needs no Wan model, one that does."""

from ffprop.nodes.evaluate.bench import repeat_first_frame

SEEN = []      # (world, settings) of each engines() call


def engines(world, settings):
    SEEN.append((world, settings))
    rows = {"keyframes": lambda s: s.target.clone()}           # the oracle: scores PSNR_CAP
    if world is not None:
        rows["keyframes_frozen"] = repeat_first_frame           # an extra row that is not in ROOM_ROWS
    return rows
