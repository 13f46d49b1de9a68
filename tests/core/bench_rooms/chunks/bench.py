"""A long-scene row: the engine's `frames` attribute makes the benchmark render its cases at 13 frames."""


def engines(world, settings):
    def chunks(s):
        assert s.target.shape[0] == 13, s.target.shape
        return s.target.clone()

    chunks.frames = 13
    return {"chunks": chunks}
