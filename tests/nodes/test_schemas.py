"""Schemas of every registered FFP node (STYLE.md 5.2/5.3): ids, names, categories, descriptions, tooltips.

Needs ComfyUI importable (COMFYUI_DIR); skips with the reason otherwise."""

from __future__ import annotations

import pytest
from comfy_support import import_comfy

import_comfy()  # skips this module with the reason when ComfyUI is not available

import traceback  # noqa: E402

from comfy_api.latest import io  # noqa: E402

try:  # an import error is reported by test_registry_imports, not as a collection error that stops the run
    from ffprop.nodes.registry import NODES
    REGISTRY_ERROR = None
except Exception:
    NODES, REGISTRY_ERROR = [], traceback.format_exc()


def schemas() -> list[io.Schema]:
    return [n.GET_SCHEMA() for n in NODES]  # GET_SCHEMA also runs ComfyUI's own schema validation


def test_registry_imports():
    assert REGISTRY_ERROR is None, f"ffprop.nodes.registry does not import:\n{REGISTRY_ERROR}"


def test_registry_lists_v3_nodes():
    assert NODES, "ffprop.nodes.registry.NODES is empty"
    not_v3 = [n for n in NODES if not (isinstance(n, type) and issubclass(n, io.ComfyNode))]
    assert not not_v3, f"not io.ComfyNode classes: {not_v3}"


def test_node_ids_unique_and_prefixed():
    ids = [s.node_id for s in schemas()]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"duplicate node ids: {dupes}"
    bad = [i for i in ids if not (i.startswith("FFP") and i.isidentifier())]
    assert not bad, f"node ids must be FFP<Verb><Noun> identifiers: {bad}"


@pytest.mark.parametrize("node", NODES, ids=lambda n: n.__name__)
def test_node_schema_is_documented(node):
    s = node.GET_SCHEMA()
    problems = []
    if not (s.display_name or "").endswith("· FFP"):
        problems.append(f"display_name {s.display_name!r} does not end with '· FFP'")
    if not (s.category or "").startswith("FFP/"):
        problems.append(f"category {s.category!r} is not under 'FFP/'")
    if not (s.description or "").strip():
        problems.append("no description")
    for inp in s.inputs or []:
        if not (inp.tooltip or "").strip():
            problems.append(f"input {inp.id!r} has no tooltip")
    for i, out in enumerate(s.outputs or []):
        if not (out.tooltip or "").strip():
            problems.append(f"output {i} ({out.display_name or out.id!r}) has no tooltip")
    assert not problems, f"{s.node_id}:\n  " + "\n  ".join(problems)


def test_v1_info_serialises():
    """What /object_info serves for each node (catches schema options ComfyUI cannot serialise)."""
    for node in NODES:
        info = node.GET_NODE_INFO_V1()
        assert info["name"] == node.GET_SCHEMA().node_id
        assert info["category"].startswith("FFP/")
