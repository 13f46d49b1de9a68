"""Every shipped workflows/*.json opened in the real frontend as a user opens it (the file dropped on the canvas:
`app.handleFile`), on whatever frontend the host ships (0.28: 1.45.x, 0.3.64: 1.27.x).

Checked, on the live graph after the frontend's own sizing (titles and widgets widen nodes):
- no missing (red) node: every node type is registered;
- no widget mismatch: every node serialises back to the widget values in the file (a widget the host added
  since, e.g. 0.28's CreateVideo bit_depth, is appended with its default);
- no alert that the file fails the frontend's workflow schema (1.27 checks it with zod);
- no two node rectangles overlap (`pos`/`size` plus the title bar above `pos`);
- every link lands on an input that names it and whose type accepts it, in the file and in the loaded graph;
- what the frontend would queue (`graphToPrompt`) is what the harness (comfy-cli, as `comfy run`) converts;
- where the frontend has a missing-models panel (1.45: Errors > Missing Models), no model is filed under "Unknown".
A screenshot of each workflow, fitted to the view, goes to FFP_E2E_SHOTS (default /tmp/ffp_web_editor_shots).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from e2e_server import TIMINGS
from e2e_workflow import comfy_cli_converter, ui_to_api

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
SHOT_DIR = Path(os.environ.get("FFP_E2E_SHOTS", "/tmp/ffp_web_editor_shots"))


@pytest.fixture(scope="module")
def wf_page(comfy_server, browser):
    from e2e_browser import post_settings

    base = comfy_server.url("")
    post_settings(base, {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
    TIMINGS["workflows in the browser: frontend load"] = browser.open_comfy(base)
    return browser


LIVE_GRAPH = """
const th = LiteGraph.NODE_TITLE_HEIGHT;
const links = [];
const all = app.graph.links instanceof Map ? [...app.graph.links.values()] : Object.values(app.graph.links || {});
for (const l of all) if (l) links.push({id: l.id, origin_id: l.origin_id, origin_slot: l.origin_slot,
                                         target_id: l.target_id, target_slot: l.target_slot, type: l.type});
return {links, nodes: app.graph.nodes.map((n) => ({
  id: n.id, type: n.type, title: n.title, registered: !!LiteGraph.registered_node_types[n.type],
  rect: [n.pos[0], n.pos[1] - th, n.size[0], n.size[1] + th], collapsed: !!(n.flags && n.flags.collapsed),
  widgets_values: n.serialize().widgets_values ?? null,
  inputs: (n.inputs || []).map((i) => ({name: i.name, type: i.type, link: i.link ?? null})),
}))};
"""


def overlaps(nodes: list[dict]) -> list[str]:
    """Pairs of node rectangles [x, y, w, h] that share area (touching edges is fine)."""
    out = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["rect"]
        for b in nodes[i + 1:]:
            bx, by, bw, bh = b["rect"]
            dx, dy = min(ax + aw, bx + bw) - max(ax, bx), min(ay + ah, by + bh) - max(ay, by)
            if dx > 0 and dy > 0:
                out.append(f"node {a['id']} {a['type']} '{a['title']}' {[round(v) for v in a['rect']]} overlaps node "
                           f"{b['id']} {b['type']} '{b['title']}' {[round(v) for v in b['rect']]} by {dx:.0f}x{dy:.0f}")
    return out


def _accepts(input_type, link_type) -> bool:
    if "*" in (input_type, link_type) or input_type == link_type:
        return True
    return isinstance(input_type, str) and str(link_type) in input_type.split(",")


def link_problems(nodes: list[dict], links: list[dict], where: str) -> list[str]:
    """Links whose target slot is not an input naming that link with a type that accepts it."""
    by_id = {n["id"]: n for n in nodes}
    out = []
    for link in links:
        target = by_id.get(link["target_id"])
        slot = link["target_slot"]
        if target is None or not 0 <= slot < len(target["inputs"]):
            out.append(f"{where}: link {link['id']} targets node {link['target_id']} slot {slot}, which does not exist")
            continue
        inp = target["inputs"][slot]
        if inp["link"] != link["id"] or not _accepts(inp["type"], link["type"]):
            named = [i["name"] for i in target["inputs"] if i["link"] == link["id"]]
            out.append(f"{where}: link {link['id']} ({link['type']}) targets node {target['id']} {target['type']} slot "
                       f"{slot} = input '{inp['name']}' ({inp['type']}, link {inp['link']}); the link is on {named}")
    return out


def file_graph(wf: dict) -> tuple[list[dict], list[dict]]:
    """The file's nodes and links in the shape LIVE_GRAPH returns."""
    nodes = [{"id": n["id"], "type": n["type"], "inputs": [{"name": i.get("name"), "type": i.get("type"),
                                                             "link": i.get("link")} for i in n.get("inputs") or []]}
             for n in wf["nodes"]]
    links = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link))
             for link in wf["links"]]
    return nodes, links


def drop_workflow(page, path: Path) -> None:
    """Open the file as a drop on the canvas does (app.handleFile), on an empty graph with no dialog open."""
    page.js("document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button').forEach((b) => b.click());"
            "app.graph.clear();")
    page.js_async("await app.handleFile(new File([args[0]], args[1], {type: 'application/json'}));",
                  path.read_text(), path.name)
    n = len(json.loads(path.read_text())["nodes"])
    page.wait_for("return app.graph.nodes.length === arguments[0];", 30, n)
    time.sleep(0.5)  # DOM widgets (image previews, the mask editor) size themselves after the first frames
    page.settle(4)


def fit_view(page, nodes: list[dict]) -> None:
    """Zoom and pan the canvas so every node is on screen (for the screenshot)."""
    x0 = min(n["rect"][0] for n in nodes)
    y0 = min(n["rect"][1] for n in nodes)
    x1 = max(n["rect"][0] + n["rect"][2] for n in nodes)
    y1 = max(n["rect"][1] + n["rect"][3] for n in nodes)
    w, h = page.js("return [app.canvas.canvas.clientWidth, app.canvas.canvas.clientHeight];")
    scale = min(w / (x1 - x0 + 120), h / (y1 - y0 + 160))
    page.js("app.canvas.ds.scale = arguments[0]; app.canvas.ds.offset = [arguments[1], arguments[2]];"
            "app.canvas.setDirty(true, true);", scale, -x0 + 60 / scale, -y0 + 100 / scale)
    page.settle(3)


def missing_models_panel(page) -> str | None:
    """The text of the frontend's Missing Models section (Errors panel), or None where the frontend has none."""
    opened = page.js("const b = [...document.querySelectorAll('button')].find((b) => b.innerText.trim() === 'See Errors');"
                     "if (!b) return false; b.click(); return true;")
    if not opened:
        return None
    text = page.wait_for("const t = document.body.innerText; const i = t.indexOf('Missing Models');"
                         "return i < 0 ? null : t.slice(i);", 15)
    end = text.find("Missing Inputs")
    return text[:end] if end > 0 else text


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in WORKFLOWS])
def test_workflow_opens_cleanly_in_the_frontend(comfy_server, object_info, wf_page, path):
    page = wf_page
    t0 = time.perf_counter()
    wf = json.loads(path.read_text())
    page.console()  # drop what earlier tests logged
    drop_workflow(page, path)
    live = page.js(LIVE_GRAPH)
    problems = [f"node {n['id']}: type {n['type']} is missing (red node)" for n in live["nodes"] if not n["registered"]]
    saved = {n["id"]: n.get("widgets_values") for n in wf["nodes"]}
    for n in live["nodes"]:  # a shift changes saved values; a widget the host added since gets its default appended
        want, got = saved.get(n["id"]), n["widgets_values"]
        if want is not None and (not isinstance(got, list) or got[:len(want)] != want):
            problems.append(f"node {n['id']} {n['type']}: widgets {got} != file {want}")
    problems += overlaps([n for n in live["nodes"] if not n["collapsed"]])
    problems += link_problems(*file_graph(wf), where=f"{path.name} (file)")
    problems += link_problems(live["nodes"], live["links"], where="loaded graph")
    problems += [f"console: {m[:300]}" for m in page.console() if "patched data" in m or "validat" in m.lower()]
    problems += [f"frontend alert: {t}" for t in page.js(  # 1.27 checks the file against its zod schema
        "return [...document.querySelectorAll('.p-toast-message')].map((t) => t.innerText.replace(/\\s+/g, ' '));")
        if "invalid" in t.lower() or "schema" in t.lower()]

    if comfy_cli_converter()[0] is not None:  # the harness runs what the frontend would queue
        sent = page.js_async("return (await app.graphToPrompt()).output;")
        ours = ui_to_api(wf, object_info)
        def declared(node: dict | None) -> dict | None:  # /prompt ignores inputs a node does not declare (1.27
            if node is None:                               # sends PreviewAny's display widget 'preview')
                return None
            spec = object_info.get(node["class_type"], {}).get("input", {})
            names = {k for section in ("required", "optional") for k in spec.get(section) or {}}
            return {"class_type": node["class_type"], "inputs": {k: v for k, v in node["inputs"].items() if k in names}}

        for nid in sorted(set(sent) | set(ours), key=int):
            if declared(sent.get(nid)) != declared(ours.get(nid)):
                problems.append(f"node {nid}: the frontend queues {sent.get(nid)}, comfy-cli converts {ours.get(nid)}")

    SHOT_DIR.mkdir(parents=True, exist_ok=True)
    if page.js("return !!document.querySelector('.p-dialog');"):  # 1.27 opens a Missing Models dialog
        page.screenshot(SHOT_DIR / f"missing_models_dialog_{path.stem}.png")
        page.js("document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click());")
    fit_view(page, live["nodes"])
    page.screenshot(SHOT_DIR / f"layout_{path.stem}.png")

    panel = missing_models_panel(page)
    if panel is not None:
        if "Unknown" in panel:
            problems.append(f"missing-models panel files a model under 'Unknown':\n{panel}")
        page.screenshot(SHOT_DIR / f"missing_models_{path.stem}.png")
    TIMINGS[f"browser: open {path.name}"] = time.perf_counter() - t0
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
