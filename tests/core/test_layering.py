"""The floors of the house (DESIGN.md 1, issue 11 item 15): nodes/video is the ground floor (it imports no other
room), evaluation sits above flow (flow never imports evaluate). Read from the source's import statements, so a
lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

NODES = Path(__file__).resolve().parents[2] / "nodes"
ROOMS = sorted(p.name for p in NODES.iterdir() if (p / "__init__.py").is_file())


def rooms_imported(room: str) -> dict[str, set[str]]:
    """{module file: the other rooms it imports} for every .py file of nodes/<room> (relative and absolute)."""
    found: dict[str, set[str]] = {}
    for path in sorted((NODES / room).rglob("*.py")):
        hits = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                depth = len(path.relative_to(NODES).parts) - 1       # nodes/<room>/x.py -> 1
                if node.level == depth + 1 and node.module:           # from ..<room>.x import ...
                    hits.add(node.module.split(".")[0])
                elif node.level == depth + 1 and not node.module:     # from .. import <room>
                    hits.update(a.name for a in node.names)
                elif node.level == 0 and node.module and node.module.startswith("ffprop.nodes."):
                    hits.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                hits.update(a.name.split(".")[2] for a in node.names if a.name.startswith("ffprop.nodes."))
        others = (hits & set(ROOMS)) - {room}
        if others:
            found[str(path.relative_to(NODES))] = others
    return found


def test_the_check_sees_real_imports():
    """Guards the checker itself: flow's engine does import video, masks' tracker does import flow."""
    assert {"video"} <= rooms_imported("flow")["flow/engine.py"]
    assert {"flow"} <= rooms_imported("masks")["masks/flow_track.py"]
    assert {"video", "flow"} <= set().union(*rooms_imported("evaluate").values())


def test_video_is_the_ground_floor():
    assert rooms_imported("video") == {}, "nodes/video must import no other room (it is what every room stands on)"


def test_flow_does_not_import_evaluate():
    bad = {f: r for f, r in rooms_imported("flow").items() if "evaluate" in r}
    assert not bad, f"nodes/flow imports the evaluation room (evaluate sits above flow): {bad}"


def test_only_evaluate_imports_metrics_among_rooms_below_it():
    """No engine room scores itself through evaluate: masks, flow and video stay below it."""
    bad = {f: r for room in ("video", "flow", "masks") for f, r in rooms_imported(room).items() if "evaluate" in r}
    assert not bad, f"rooms below evaluation import it: {bad}"
