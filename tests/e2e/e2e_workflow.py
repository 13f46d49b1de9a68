"""Workflow JSON for the e2e tier: UI format (what the frontend saves) -> API format (what POST /prompt takes).

The conversion itself is comfy-cli's (`comfy_cli.workflow_to_api.convert_ui_to_api`, the function `comfy run
--workflow <ui.json>` calls after GET /object_info): Note/MarkdownNote/PrimitiveNode/Reroute/GetNode/SetNode
resolved, muted nodes dropped, bypassed nodes passed through by type, control_after_generate and upload-button
values skipped, defaults filled, subgraphs expanded. What this module adds is only what `comfy run` does not do:

- a clear error for a file that is not a workflow, and for node types the server does not know (comfy-cli passes
  them through and /prompt answers "node does not exist"; here the message names the missing pack);
- links saved as objects (workflow schema 1) are read too (comfy-cli skips them: the input would silently keep
  its widget value);
- the CI-sizing overrides of a shipped workflow's `extra.ffprop_ci` (`apply_ci_overrides`).

comfy-cli is installed with the host (HOST.md 0b: `pip install -r requirements.txt comfy-cli`); without it the
callers skip with that reason (`comfy_cli_converter`).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

UI_ONLY_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute", "GetNode", "SetNode"}


class WorkflowFormatError(ValueError):
    """The JSON is not a workflow the harness can run (the message says why and what to do)."""


def workflow_format(data: Any) -> str:
    """'ui', 'api' or 'unknown'."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        return "ui"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return "api"
    return "unknown"


def comfy_cli_converter() -> tuple[Callable[[dict, dict], dict] | None, str]:
    """(comfy-cli's convert_ui_to_api, "") or (None, why it is unavailable)."""
    try:
        from comfy_cli.workflow_to_api import convert_ui_to_api
    except ImportError as e:
        return None, f"comfy-cli is not installed in this interpreter ({e}); pip install comfy-cli"
    return convert_ui_to_api, ""


def node_types(ui: dict) -> set[str]:
    """Every node type a UI workflow uses, inside subgraph definitions too (subgraph instances excluded)."""
    subgraphs = (ui.get("definitions") or {}).get("subgraphs") or []
    types = {n.get("type") for n in ui.get("nodes") or []}
    for sg in subgraphs:
        types |= {n.get("type") for n in sg.get("nodes") or []}
    return types - {sg.get("id") for sg in subgraphs}


def ui_to_api(ui: Any, object_info: dict[str, dict]) -> dict[str, dict]:
    """A UI-format workflow as the API prompt `comfy run --workflow` would POST (API-format input is returned as is)."""
    fmt = workflow_format(ui)
    if fmt == "api":
        return copy.deepcopy(ui)
    if fmt != "ui":
        raise WorkflowFormatError(
            "not a ComfyUI workflow: expected the UI format (keys 'nodes' and 'links', as saved by the frontend) "
            "or the API format ({node_id: {'class_type', 'inputs'}}, as exported by 'Export (API)')"
        )
    unknown = sorted(t for t in node_types(ui) - UI_ONLY_TYPES - set(object_info) if t)
    if unknown:
        raise WorkflowFormatError(f"node type(s) {unknown} are not known to this server (missing custom node pack, "
                                  "or a pack that failed to import: see the server log)")
    convert, why = comfy_cli_converter()
    if convert is None:
        raise WorkflowFormatError(why)
    ui = copy.deepcopy(ui)
    # schema-1 files save links as objects; comfy-cli reads only [id, from, from_slot, to, to_slot, type]
    ui["links"] = [[link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
                   if isinstance(link, dict) else link for link in ui.get("links") or []]
    api = convert(ui, object_info)
    if not api:
        raise WorkflowFormatError("the workflow has no executable nodes")
    return api


def apply_ci_overrides(api: dict[str, dict], ci: dict | None) -> dict[str, dict]:
    """Apply `extra.ffprop_ci` to an API prompt (returns a copy).

    `inputs`: {node id: {input: value}} sets widget values (or links, as [node id, slot]);
    `replace`: {node id: {"class_type", "inputs"}} swaps a node for another (e.g. a text encoder for the
    test pack's zero conditioning); `remove`: [node id, ...] drops nodes (e.g. a loader nothing uses any more).
    """
    api = copy.deepcopy(api)
    ci = ci or {}
    unknown = set(ci) - {"inputs", "files", "replace", "remove", "timeout_s", "notes"}
    if unknown:
        raise WorkflowFormatError(f"extra.ffprop_ci has unknown keys {sorted(unknown)}; "
                                  "known: inputs, files, replace, remove, timeout_s, notes")
    for nid, node in (ci.get("replace") or {}).items():
        if "class_type" not in node:
            raise WorkflowFormatError(f"extra.ffprop_ci.replace[{nid!r}] needs a class_type")
        api[str(nid)] = {"class_type": node["class_type"], "inputs": dict(node.get("inputs") or {}),
                         "_meta": {"title": f"{node['class_type']} (CI replacement)"}}
    for nid in ci.get("remove") or []:
        api.pop(str(nid), None)
    for nid, values in (ci.get("inputs") or {}).items():
        if str(nid) not in api:
            raise WorkflowFormatError(f"extra.ffprop_ci.inputs names node {nid!r}, which is not in the workflow "
                                      f"(nodes: {sorted(api, key=lambda s: int(s) if s.isdigit() else 0)})")
        api[str(nid)]["inputs"].update(values)
    return api
