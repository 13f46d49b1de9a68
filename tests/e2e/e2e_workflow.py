"""Workflow JSON for the e2e tier: UI format (what the frontend saves) -> API format (what POST /prompt takes).

Pure Python, no ComfyUI import: the only host knowledge needed is the server's GET /object_info answer
(HOST.md 1f). Rules, as the frontend's "Export (API)" applies them:

- a node's `widgets_values` are positional over its *widget* inputs (INT, FLOAT, STRING, BOOLEAN, COMBO, not
  `forceInput`), in `input_order` (required, then optional);
- an INT/COMBO widget with `control_after_generate` (or named seed/noise_seed) is followed by one extra value
  ("fixed", "increment", "decrement", "randomize") that is not an input; so is an upload combo (LoadImage,
  LoadVideo) by its upload button's value ("image", "video", "audio") when present;
- a widget converted to an input keeps its slot in `widgets_values`; when it is linked the link wins;
- a widget with no saved value gets its default (or a combo's first option), as the frontend would;
- links are `[id, from_node, from_slot, to_node, to_slot, type]` (or objects with the same names);
- Note/MarkdownNote (no inputs) are dropped, Reroute is followed through, a PrimitiveNode's value is written
  into the widgets it feeds, muted nodes (mode 2) are dropped, bypassed nodes (mode 4) are passed through by type.

Anything else (subgraphs, unknown node types, an API-format file given where UI was expected) raises
`WorkflowFormatError` with a message that says what was found and what to do.
"""

from __future__ import annotations

import copy
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_KEYS = {"image_upload": "image", "video_upload": "video", "audio_upload": "audio"}
SKIP_TYPES = {"Note", "MarkdownNote"}
VIRTUAL_TYPES = {"Reroute", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowFormatError(ValueError):
    """The JSON is not a workflow this converter understands (the message says why and what to do)."""


def workflow_format(data: Any) -> str:
    """'ui', 'api' or 'unknown'."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        return "ui"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return "api"
    return "unknown"


def _input_spec(info: dict, name: str) -> tuple[Any, dict]:
    for section in ("required", "optional"):
        spec = info.get("input", {}).get(section, {}).get(name)
        if spec is not None:
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return typ, opts
    return None, {}


def _is_widget(typ: Any, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _has_control(name: str, typ: Any, opts: dict) -> bool:
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return typ == "INT" and name in ("seed", "noise_seed")


def _is_control_value(value: Any, names: list[str], name: str, info: dict) -> bool:
    """The saved control_after_generate value: a mode string, or a bool in files from old frontends."""
    if isinstance(value, str):
        return value in CONTROL_VALUES
    if isinstance(value, bool):
        nxt = names.index(name) + 1
        return nxt >= len(names) or _input_spec(info, names[nxt])[0] != "BOOLEAN"
    return False


def widget_defaults(info: dict) -> dict[str, Any]:
    """What the frontend puts in a widget that has no saved value: the default, or a combo's first option."""
    out = {}
    for name in widget_names(info):
        typ, opts = _input_spec(info, name)
        if "default" in opts:
            out[name] = opts["default"]
        elif isinstance(typ, list) and typ:
            out[name] = typ[0]
        elif typ == "COMBO" and opts.get("options"):
            out[name] = opts["options"][0]
    return out


def widget_names(info: dict) -> list[str]:
    """Names of a node's widget inputs, in the frontend's order (required, then optional)."""
    order = info.get("input_order") or {s: list(info.get("input", {}).get(s, {})) for s in ("required", "optional")}
    names = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            typ, opts = _input_spec(info, name)
            if typ is not None and _is_widget(typ, opts):
                names.append(name)
    return names


def map_widgets(class_type: str, info: dict, values: Any) -> dict[str, Any]:
    """Map a node's `widgets_values` onto its widget input names."""
    names = widget_names(info)
    if isinstance(values, dict):  # some packs save widgets by name
        return {k: v for k, v in values.items() if k in names}
    values = list(values or [])
    out: dict[str, Any] = {}
    i = 0
    for name in names:
        if i >= len(values):
            break
        typ, opts = _input_spec(info, name)
        out[name] = values[i]
        i += 1
        if _has_control(name, typ, opts) and i < len(values) and _is_control_value(values[i], names, name, info):
            i += 1
        upload = next((v for k, v in UPLOAD_KEYS.items() if opts.get(k)), None)
        if upload and i < len(values) and values[i] == upload:
            i += 1
    return out


def _links_by_id(ui: dict) -> dict[int, tuple[int, int, int, int]]:
    links = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            lid, a, a_slot, b, b_slot = (link[k] for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot"))
        elif isinstance(link, list) and len(link) >= 5:
            lid, a, a_slot, b, b_slot = link[:5]
        else:
            raise WorkflowFormatError(f"unreadable link {link!r}: expected [id, from, from_slot, to, to_slot, type]")
        links[int(lid)] = (int(a), int(a_slot), int(b), int(b_slot))
    return links


def ui_to_api(ui: dict, object_info: dict[str, dict]) -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt, using the server's /object_info."""
    fmt = workflow_format(ui)
    if fmt == "api":
        return copy.deepcopy(ui)
    if fmt != "ui":
        raise WorkflowFormatError(
            "not a ComfyUI workflow: expected the UI format (keys 'nodes' and 'links', as saved by the frontend) "
            "or the API format ({node_id: {'class_type', 'inputs'}}, as exported by 'Export (API)')"
        )
    if (ui.get("definitions") or {}).get("subgraphs"):
        raise WorkflowFormatError("this workflow uses subgraphs, which the e2e converter does not expand; "
                                  "unpack them in the frontend (right click > Unpack Subgraph) and save again")
    nodes = {int(n["id"]): n for n in ui["nodes"]}
    links = _links_by_id(ui)

    def source(link_id: int | None, seen: frozenset = frozenset()) -> tuple[str, Any] | None:
        """Follow a link to a real output: ('link', [node, slot]), ('value', v) for a primitive, or None."""
        if link_id is None or link_id not in links:
            return None
        a, a_slot, _, _ = links[link_id]
        if a in seen:
            raise WorkflowFormatError(f"link cycle through node {a}")
        node = nodes.get(a)
        if node is None:
            raise WorkflowFormatError(f"link {link_id} starts at node {a}, which is not in the workflow")
        if node.get("type") == "Reroute":
            return source(node["inputs"][0].get("link"), seen | {a})
        if node.get("type") == "PrimitiveNode":
            return ("value", (node.get("widgets_values") or [None])[0])
        if node.get("mode") == MODE_MUTED:
            return None
        if node.get("mode") == MODE_BYPASS:
            out_type = (node.get("outputs") or [{}] * (a_slot + 1))[a_slot].get("type")
            for inp in node.get("inputs") or []:
                if inp.get("type") == out_type and inp.get("link") is not None:
                    return source(inp["link"], seen | {a})
            return None
        return ("link", [str(a), a_slot])

    api: dict[str, dict] = {}
    for nid, node in sorted(nodes.items()):
        ctype = node.get("type")
        if ctype in SKIP_TYPES or ctype in VIRTUAL_TYPES or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(ctype)
        if info is None:
            raise WorkflowFormatError(
                f"node {nid} has type {ctype!r}, which this server does not know (missing custom node pack, "
                "or a pack that failed to import: see the server log)"
            )
        inputs = {**widget_defaults(info), **map_widgets(ctype, info, node.get("widgets_values"))}
        for inp in node.get("inputs") or []:
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            src = source(inp.get("link"))
            if src is None:
                continue
            inputs[name] = src[1]
        api[str(nid)] = {"class_type": ctype, "inputs": inputs, "_meta": {"title": node.get("title") or ctype}}
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
