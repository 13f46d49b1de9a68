"""A broken room module: its import fails; the benchmark names it in the skipped rows' reason."""

import ffprop_no_such_dependency  # noqa: F401


def engines(world, settings):
    return {"lora_edit_wan22": None}
