"""The mask prompt editor (web/js/ffp_prompt_editor.js) in a real browser on the real ComfyUI frontend and server.

Headless Chromium (Debian `chromium` + `chromium-driver`) driven by selenium (tests/e2e/e2e_browser.py says why).
The server is the e2e harness's (only this pack + the test pack loaded). The graph is the user's:
LoadVideo -> GetVideoComponents -> FFPMaskPrompts -> FFPMaskPropagate (flow) -> PreviewImage.

Checked: the frame arrives through GET /ffprop/frame before any run; real clicks (left, shift, right, drag, ctrl,
object switch, undo) give the expected JSON in SOURCE pixels, also after zooming the canvas and resizing the node;
the pixels under the pointer are the source pixels the JSON names; the JSON is what graphToPrompt sends; it survives
serialize -> JSON text -> loadGraphData; the queued graph validates and runs on the server (parse_prompts accepts
it) and the executed frame replaces the route's, identical to it; the help page is where the frontend looks.
Skips with the reason when COMFYUI_DIR is unset, or Chromium/chromedriver/selenium are missing.
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from e2e_server import TIMINGS
from ffprop.nodes.video.frames import to_uint8
from ffprop.nodes.video.io import write_image, write_video
from ffprop.nodes.video.synthetic import synthetic_clip
from PIL import Image

CLIP = "ffp_editor_clip.mp4"
STILL = "ffp_editor_still.png"
T, H, W = 9, 96, 160
FRAME = 2
OBJ_COLORS = {1: (0x4C, 0xC9, 0xF0), 2: (0xF7, 0x25, 0x85)}  # web/js/lib/ffp_prompts.js OBJECT_COLORS[0:2]
SHOT_DIR = Path(os.environ.get("FFP_E2E_SHOTS", "/tmp/ffp_web_editor_shots"))


def host_decoded_frames(server, filename: str) -> np.ndarray:
    """The frames the host's own LoadVideo gives a node (LoadVideo -> GetVideoComponents -> SaveImage on the server,
    lossless PNG): uint8 [T, H, W, 3]. The reference for what the editor must show: hosts decode differently (0.28
    converts YUV through float RGB with interpolated chroma, 0.3.64 and PyAV's rgb24 replicate chroma per 2x2 block:
    up to ~80 levels apart at colour edges), and the user clicks on the frame the node gets."""
    api = {"1": {"class_type": "LoadVideo", "inputs": {"file": filename}},
           "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
           "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "e2e/decoded"}}}
    res = server.run_prompt(api, timeout=120, label=f"host decode of {filename}")
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in res.files])


@pytest.fixture(scope="module")
def clip(comfy_server):
    """The clip (and a still) in the server's input folder: {"frames": uint8 [T, H, W, 3] as the host's LoadVideo
    decodes them, "still": the PNG's uint8 [H, W, 3]}."""
    source = synthetic_clip(T, H, W, seed=3).source
    write_video(comfy_server.input_dir / CLIP, source, fps=8)
    write_image(comfy_server.input_dir / STILL, source[5])
    frames = host_decoded_frames(comfy_server, CLIP)
    assert frames.shape == (T, H, W, 3), frames.shape
    return {"frames": frames, "still": to_uint8(source[5])}


@pytest.fixture(scope="module")
def page(comfy_server, browser, clip):
    from e2e_browser import post_settings

    base = comfy_server.url("")
    post_settings(base, {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
    TIMINGS["web editor: frontend load"] = browser.open_comfy(base)
    browser.wait_for("return app.extensions.some((e) => e.name === 'FFP.MaskPromptEditor')", 30)
    return browser


@pytest.fixture
def fresh(page):
    """Each test starts from an empty graph at zoom 1 with no dialog open (a failed run opens an error dialog)."""
    page.js("document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click());"
            "app.graph.clear(); app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];")
    page.settle(2)
    return page


def http_get(server, path: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(server.url(path), timeout=60) as r:  # noqa: S310 (local test server)
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


# ---- the route and the help page through the real server (no browser needed) --------------------------------------
def test_frame_route_on_the_server(comfy_server, clip):
    status, body, headers = http_get(comfy_server, f"/api/ffprop/frame?filename={CLIP}&type=input&frame=4")
    assert status == 200 and headers["Content-Type"] == "image/png", body[:200]
    shown = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
    # the frame LoadVideo gives the node (SaveImage truncates floats, the route rounds: 1 level apart at most)
    assert np.abs(shown - clip["frames"][4]).max() <= 1, np.abs(shown - clip["frames"][4]).max()
    assert (headers["X-FFP-Width"], headers["X-FFP-Height"]) == (str(W), str(H))
    for query, code, words in [
        (f"filename={CLIP}&frame={T}", 400, f"{T} frame(s)"),
        ("filename=../../etc/passwd", 403, "outside"),
        (f"filename={CLIP}&subfolder=..", 403, "outside"),
        ("filename=nothing_here.mp4", 404, "no file"),
        (f"filename={CLIP}&type=models", 400, "type must be"),
    ]:
        status, body, _ = http_get(comfy_server, f"/ffprop/frame?{query}")
        assert status == code, (query, status, body[:300])
        assert words in json.loads(body)["error"], body


def test_help_page_is_served_where_the_frontend_looks(comfy_server):
    info = comfy_server.get("/object_info/FFPMaskPrompts")["FFPMaskPrompts"]
    pack = info["python_module"].split(".", 1)[1]  # frontend: extractCustomNodeName("custom_nodes.<pack>")
    status, body, _ = http_get(comfy_server, f"/extensions/{pack}/docs/FFPMaskPrompts.md")
    assert status == 200 and b"shift + click" in body


# ---- the editor ---------------------------------------------------------------------------------------------------
def workflow(prompts: str = "", frame: int = FRAME) -> dict:
    """UI-format graph: LoadVideo -> GetVideoComponents -> FFPMaskPrompts -> FFPMaskPropagate(flow) -> PreviewImage."""
    def node(id_, type_, pos, size, inputs, outputs, widgets):
        return {"id": id_, "type": type_, "pos": pos, "size": size, "flags": {}, "order": id_ - 1, "mode": 0,
                "inputs": inputs, "outputs": outputs, "properties": {}, "widgets_values": widgets}

    return {
        "last_node_id": 5, "last_link_id": 5, "groups": [], "config": {}, "version": 0.4,
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
        "links": [[1, 1, 0, 2, 0, "VIDEO"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 5, "FFP_MASK_PROMPTS"],
                  [4, 2, 0, 4, 0, "IMAGE"], [5, 4, 2, 5, 0, "IMAGE"]],
        "nodes": [
            node(1, "LoadVideo", [20, 60], [300, 330], [], [{"name": "VIDEO", "type": "VIDEO", "links": [1]}],
                 [CLIP, "image"]),
            node(2, "GetVideoComponents", [20, 440], [260, 110], [{"name": "video", "type": "VIDEO", "link": 1}],
                 [{"name": "images", "type": "IMAGE", "links": [2, 4]}, {"name": "audio", "type": "AUDIO", "links": None},
                  {"name": "fps", "type": "FLOAT", "links": None}], []),
            node(3, "FFPMaskPrompts", [380, 60], [480, 460], [{"name": "images", "type": "IMAGE", "link": 2}],
                 [{"name": "prompts", "type": "FFP_MASK_PROMPTS", "links": [3]}], [frame, prompts]),
            node(4, "FFPMaskPropagate", [900, 60], [320, 300],
                 [{"name": "images", "type": "IMAGE", "link": 4},
                  *({"name": w, "type": t, "widget": {"name": w}, "link": None} for w, t in
                    (("engine", "COMBO"), ("direction", "COMBO"), ("mask_frame", "INT"), ("flow_quality", "COMBO"))),
                  {"name": "prompts", "type": "FFP_MASK_PROMPTS", "link": 3, "shape": 7},
                  {"name": "mask", "type": "MASK", "link": None, "shape": 7},
                  {"name": "sam2", "type": "FFP_SAM2", "link": None, "shape": 7}],
                 [{"name": "mask", "type": "MASK", "links": None}, {"name": "object_masks", "type": "MASK", "links": None},
                  {"name": "preview", "type": "IMAGE", "links": [5]}, {"name": "num_objects", "type": "INT", "links": None}],
                 ["flow", "both", 0, "fast"]),
            node(5, "PreviewImage", [900, 400], [320, 300], [{"name": "images", "type": "IMAGE", "link": 5}], [], []),
        ],
    }


def editor_state(page, node_id: int = 3) -> dict:
    return page.js("""
        const n = app.graph.getNodeById(arguments[0]); const e = n.ffpEditor; const c = e.canvas;
        const r = c.getBoundingClientRect();
        return {text: n.widgets.find((w) => w.name === 'prompts').value, object: e.object,
                image: e.image && {w: e.image.width, h: e.image.height, origin: e.image.origin, url: e.image.url},
                rect: {left: r.left, top: r.top, width: r.width, height: r.height}, cw: c.width, ch: c.height,
                status: e.statusEl.textContent, hidden: n.widgets.find((w) => w.name === 'prompts').hidden};""",
                   node_id)


class View:
    """The displayed image's geometry, computed here from the browser's facts (the canvas' client rect, its backing
    size, the image size), independently of the editor's own code: object-fit 'contain', centred."""

    def __init__(self, st: dict):
        r, cw, ch = st["rect"], st["cw"], st["ch"]
        iw, ih = st["image"]["w"], st["image"]["h"]
        self.scale = min(cw / iw, ch / ih)
        self.ox, self.oy = (cw - iw * self.scale) / 2, (ch - ih * self.scale) / 2
        self.r, self.cw, self.ch = r, cw, ch

    def client(self, sx: float, sy: float) -> tuple[int, int]:
        """The integer client position nearest to source pixel position (sx, sy)."""
        px = self.r["left"] + (self.ox + sx * self.scale) * self.r["width"] / self.cw
        py = self.r["top"] + (self.oy + sy * self.scale) * self.r["height"] / self.ch
        return round(px), round(py)

    def source(self, x: int, y: int) -> tuple[float, float]:
        """The exact source position of client pixel (x, y) (what the JSON must say, up to its 0.1 px rounding)."""
        cx = (x - self.r["left"]) * self.cw / self.r["width"]
        cy = (y - self.r["top"]) * self.ch / self.r["height"]
        return (cx - self.ox) / self.scale, (cy - self.oy) / self.scale

    @property
    def screen_px_per_source_px(self) -> float:
        return self.scale * self.r["width"] / self.cw


def assert_pixels_under_pointer(page, view: View, frame: np.ndarray, spots, label: str):
    """The screenshot at each client spot shows the source pixel the mapping names (display <-> source check)."""
    shot = page.screenshot_rgb()
    for sx, sy in spots:
        x, y = view.client(sx + 0.5, sy + 0.5)  # centre of source pixel (sx, sy)
        got = shot[y, x].astype(int)
        want = frame[sy, sx].astype(int)
        assert np.abs(got - want).max() <= 24, f"{label}: screen {x},{y} shows {got}, source ({sx},{sy}) is {want}"


def assert_marker_at(page, x: int, y: int, color, label: str, radius: int = 5):
    """A point marker in the object's colour is drawn within `radius` screen px of (x, y)."""
    shot = page.screenshot_rgb()[y - radius:y + radius + 1, x - radius:x + radius + 1].astype(int)
    dist = np.abs(shot - np.array(color)).max(-1)
    assert dist.min() <= 40, f"{label}: no marker of colour {color} near {x},{y} (closest {dist.min()})"


def click_button(page, selector: str, node_id: int = 3):
    """Click a toolbar button of the editor with a real pointer event."""
    r = page.js("""const b = app.graph.getNodeById(arguments[0]).ffpEditor.root.querySelector(arguments[1]);
                   const r = b.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2];""",
                node_id, selector)
    page.click_at(round(r[0]), round(r[1]))
    page.settle(1)


def near(a, b, tol=1.0):
    return all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b)) and len(a) == len(b)


def test_editor_clicks_zoom_save_reload_and_run(comfy_server, fresh, clip):
    page = fresh
    t0 = time.perf_counter()
    SHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.js_async("await app.loadGraphData(args[0]);", workflow())
    page.settle()
    page.wait_for("const e = app.graph.getNodeById(3).ffpEditor; return e.image && e.image.origin === 'file';", 30)
    page.settle()
    st = editor_state(page)
    assert st["hidden"] is True and st["text"] == ""
    assert (st["image"]["w"], st["image"]["h"]) == (W, H)
    view = View(st)
    assert view.screen_px_per_source_px > 2  # 160 px shown ~460 px wide
    assert_pixels_under_pointer(page, view, clip["frames"][FRAME], [(10, 10), (80, 48), (150, 90), (33, 71)], "zoom 1")

    expected: dict[int, dict[str, list]] = {1: {"points": [], "boxes": []}, 2: {"points": [], "boxes": []}}

    def click(sx, sy, obj, label, **kw):
        x, y = view.client(sx, sy)
        page.click_at(x, y, **kw)
        if label is not None:
            expected[obj]["points"].append([*view.source(x, y), label])
        return x, y

    def drag(a, b, obj):
        x0, y0 = view.client(*a)
        x1, y1 = view.client(*b)
        page.drag(x0, y0, x1, y1)
        s0, s1 = view.source(x0, y0), view.source(x1, y1)
        expected[obj]["boxes"].append([min(s0[0], s1[0]), min(s0[1], s1[1]), max(s0[0], s1[0]), max(s0[1], s1[1])])

    # object 1: positive, shift = negative, right = negative, a box
    pa = click(40.3, 30.7, 1, 1)
    click(100, 20, 1, 0, shift=True)
    click(70, 80, 1, 0, button="right")
    drag((20, 15), (60, 50), 1)
    page.settle(1)
    assert_marker_at(page, *pa, OBJ_COLORS[1], "positive point, object 1")
    # object 2: new id, a point and a box; one extra click undone; one point deleted with ctrl+click
    click_button(page, "[data-ffp-action=new-object]")
    assert editor_state(page)["object"] == 2
    pe = click(120, 60, 2, 1)
    drag((110, 40), (150, 85), 2)
    click(5, 90, 2, None)
    click_button(page, "[data-ffp-action=undo]")
    page.click_at(pe[0] + 2, pe[1] - 1, ctrl=True)  # deletes the nearest point: pe
    expected[2]["points"].remove(next(p for p in expected[2]["points"] if p[2] == 1))
    page.settle(1)
    page.screenshot(SHOT_DIR / "editor_zoom1.png")

    def check_json(text: str, what: str):
        doc = json.loads(text)
        assert (doc["version"], doc["width"], doc["height"]) == (1, W, H), what
        got = {p["object"]: p for p in doc["prompts"]}
        assert all(p["frame"] == FRAME for p in doc["prompts"]) and set(got) == {1, 2}, (what, doc)
        for obj, exp in expected.items():
            assert len(got[obj]["points"]) == len(exp["points"]), (what, obj, got[obj], exp)
            for g, e in zip(got[obj]["points"], exp["points"]):
                assert g[2] == e[2] and near(g[:2], e[:2]), (what, obj, g, e)
            assert len(got[obj]["boxes"]) == len(exp["boxes"]), (what, obj, got[obj], exp)
            for g, e in zip(got[obj]["boxes"], exp["boxes"]):
                assert near(g, e), (what, obj, g, e)

    check_json(editor_state(page)["text"], "zoom 1")

    # zoom the canvas in, resize the node: clicks still land in source pixels
    page.js("app.canvas.ds.scale = 1.6; app.canvas.ds.offset = [-300, -20]; "
            "app.graph.getNodeById(3).setSize([560, 420]);")
    page.settle(4)
    time.sleep(0.3)  # ResizeObserver -> redraw
    page.settle(2)
    view = View(editor_state(page))
    assert view.screen_px_per_source_px > 4
    assert_pixels_under_pointer(page, view, clip["frames"][FRAME], [(12, 12), (90, 40), (140, 88)], "zoom 1.6")
    ph = click(88.4, 66.2, 2, 1)
    page.settle(1)
    assert_marker_at(page, *ph, OBJ_COLORS[2], "positive point, object 2, zoom 1.6", radius=8)
    page.screenshot(SHOT_DIR / "editor_zoom1.6.png")
    # zoom out
    page.js("app.canvas.ds.scale = 0.7; app.canvas.ds.offset = [100, 40];")
    page.settle(4)
    view = View(editor_state(page))
    click_button(page, "[data-ffp-action=new-object]")  # object 3 ...
    click_button(page, "[data-ffp-object='1']")  # ... and back to 1
    drag((62, 62), (98, 92), 1)
    page.settle(1)
    page.screenshot(SHOT_DIR / "editor_zoom0.7.png")
    text = editor_state(page)["text"]
    check_json(text, "after zoom/resize")

    # ComfyUI's own undo/redo (its change tracker snapshots the graph on mouseup) reverts the last click too
    page.click_at(1100, 800)  # empty canvas: nothing focused that eats keys
    page.press("z", ctrl=True)
    page.wait_for("return app.graph.getNodeById(3).widgets.find((w) => w.name === 'prompts').value !== arguments[0]",
                  10, text)
    undone = json.loads(editor_state(page)["text"])
    assert sum(len(p["boxes"]) for p in undone["prompts"]) == 2  # the last box (zoom 0.7) is gone
    page.press("y", ctrl=True)
    page.wait_for("return app.graph.getNodeById(3).widgets.find((w) => w.name === 'prompts').value === arguments[0]",
                  10, text)
    page.settle(2)
    assert page.js("return app.graph.getNodeById(3).ffpEditor.doc.prompts.reduce((n, p) => n + p.boxes.length, 0)") == 3

    # what the frontend sends: graphToPrompt (the queued API prompt) and the saved workflow carry the same JSON
    sent = page.js_async("const p = await app.graphToPrompt(); return p.output['3'].inputs.prompts;")
    assert sent == text
    saved = page.js("return JSON.stringify(app.graph.serialize());")
    node3 = next(n for n in json.loads(saved)["nodes"] if n["id"] == 3)
    assert node3["widgets_values"] == [FRAME, text]

    # reload from the saved text into a fresh graph: the editor shows the same prompts
    page.js_async("app.graph.clear(); await app.loadGraphData(JSON.parse(args[0]));", saved)
    page.wait_for("const e = app.graph.getNodeById(3).ffpEditor; return e.image && e.image.origin === 'file';", 30)
    page.settle(3)
    st = editor_state(page)
    assert st["text"] == text
    assert page.js("return app.graph.getNodeById(3).ffpEditor.doc.prompts.length") == 2
    view = View(st)
    assert_marker_at(page, *view.client(*expected[1]["points"][0][:2]), OBJ_COLORS[1], "reloaded point", radius=8)
    page.screenshot(SHOT_DIR / "editor_reloaded.png")

    # run the graph from the frontend: the server validates the JSON (parse_prompts) and runs the flow engine on the
    # boxes; the executed clean frame replaces the route's frame and is the same image
    before = set(comfy_server.get("/history"))  # the session's server may have run other tests' prompts
    page.js_async("await app.queuePrompt(0, 1);")
    page.wait_for("const e = app.graph.getNodeById(3).ffpEditor; return e.image && e.image.origin === 'run';", 120)
    deadline = time.perf_counter() + 120
    while not (new := set(history := comfy_server.get("/history")) - before) and time.perf_counter() < deadline:
        time.sleep(0.2)  # the prompt node reports before the propagation downstream has finished
    (entry,) = (history[k] for k in new)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
    (shown,) = entry["outputs"]["3"]["images"]
    run_frame = np.asarray(Image.open(comfy_server.temp_dir / shown.get("subfolder", "") / shown["filename"]))
    assert run_frame.shape == (H, W, 3)
    assert np.abs(run_frame.astype(int) - clip["frames"][FRAME].astype(int)).max() <= 1
    assert editor_state(page)["text"] == text  # the run did not touch the prompts
    page.settle(2)
    page.screenshot(SHOT_DIR / "editor_after_run.png")
    TIMINGS["web editor: clicks, zoom, reload, run"] = time.perf_counter() - t0


def test_editor_hint_without_frame_then_load_image(comfy_server, fresh, clip):
    """No source: the hint; a LoadImage source: its frame (an image has one frame)."""
    page = fresh
    wf = workflow()
    wf["nodes"] = [n for n in wf["nodes"] if n["id"] == 3]
    wf["nodes"][0]["inputs"][0]["link"] = None
    wf["nodes"][0]["outputs"][0]["links"] = []
    wf["nodes"][0]["widgets_values"] = [0, ""]
    wf["links"] = []
    page.js_async("await app.loadGraphData(args[0]);", wf)
    page.settle(3)
    st = editor_state(page)
    assert st["image"] is None
    assert page.js("return app.graph.getNodeById(3).ffpEditor.status") == ""  # the canvas shows the hint (screenshot)
    page.screenshot(SHOT_DIR / "editor_no_frame.png")
    page.js("""const img = LiteGraph.createNode('LoadImage'); img.pos = [20, 60]; app.graph.add(img);
               img.widgets.find((w) => w.name === 'image').value = arguments[0];
               img.connect(0, app.graph.getNodeById(3), 0);""", STILL)
    page.wait_for("const e = app.graph.getNodeById(3).ffpEditor; return e.image && e.image.origin === 'file';", 30)
    page.settle(2)
    st = editor_state(page)
    assert (st["image"]["w"], st["image"]["h"]) == (W, H)
    view = View(st)
    assert_pixels_under_pointer(page, view, clip["still"], [(20, 20), (100, 70)], "LoadImage")
    # one click, then Undo: back to the untouched "" (not an empty document), so the workflow is unchanged
    page.click_at(*view.client(60, 30))
    assert json.loads(editor_state(page)["text"])["prompts"][0]["points"]
    click_button(page, "[data-ffp-action=undo]")
    assert editor_state(page)["text"] == ""
    page.click_at(*view.client(W - 0.4, H - 0.4))  # inside the last pixel, past W-1: clamped to the pixel index
    ((x, y, _),) = json.loads(editor_state(page)["text"])["prompts"][0]["points"]
    assert (x, y) == (W - 1, H - 1)
    severe = [m for m in page.console() if "SEVERE" in m and "ffp" in m.lower()]
    assert not severe, severe


def test_editor_frame_change_makes_keyframes(comfy_server, fresh, clip):
    """Changing `frame` fetches that frame; prompts on other frames stay in the JSON but are not drawn."""
    page = fresh
    from ffprop.nodes.masks.prompts import parse_prompts

    start = json.dumps({"version": 1, "width": W, "height": H,
                        "prompts": [{"frame": FRAME, "object": 1, "points": [[50, 40, 1]], "boxes": []}]})
    page.js_async("await app.loadGraphData(args[0]);", workflow(prompts=start))
    page.wait_for("const e = app.graph.getNodeById(3).ffpEditor; return e.image && e.image.origin === 'file';", 30)
    page.settle(2)
    view = View(editor_state(page))
    assert_marker_at(page, *view.client(50, 40), OBJ_COLORS[1], "loaded point on frame 2", radius=8)
    page.js("const w = app.graph.getNodeById(3).widgets.find((w) => w.name === 'frame'); w.value = 6; w.callback(6);")
    page.wait_for("const e = app.graph.getNodeById(3).ffpEditor; "
                  "return e.image && e.image.key === e.sourceKey && e.sourceKey.includes('\"frame\":6');", 30)
    page.settle(2)
    view = View(editor_state(page))
    assert_pixels_under_pointer(page, view, clip["frames"][6], [(50, 40), (8, 80), (151, 9)], "frame 6")
    x0, y0 = view.client(30, 20)
    x1, y1 = view.client(75, 70)
    page.drag(x0, y0, x1, y1)
    page.settle(1)
    page.screenshot(SHOT_DIR / "editor_frame6.png")
    st = editor_state(page)
    assert "prompted frames: 2, 6" in st["status"], st["status"]
    parsed = parse_prompts(st["text"], T, H, W)  # the node's own parser accepts what the editor wrote
    # a frame past the end: the route's message is shown and there is nothing to click on
    page.js("const w = app.graph.getNodeById(3).widgets.find((w) => w.name === 'frame'); w.value = 40; w.callback(40);")
    page.wait_for("const e = app.graph.getNodeById(3).ffpEditor; return !e.image && e.status.includes('out of range');",
                  30)
    assert f"has {T} frame(s)" in page.js("return app.graph.getNodeById(3).ffpEditor.status")
    assert parsed.keyframes == (FRAME, 6) and parsed.objects == (1,)
    (box,) = next(e for e in parsed.entries if e.frame == 6).boxes
    assert near(box, [*view.source(x0, y0), *view.source(x1, y1)])


def test_prompt_document_helpers(comfy_server, page):
    """web/js/lib/ffp_prompts.js in the browser: parsing is tolerant, edits are immutable, geometry inverts."""
    pack = comfy_server.get("/object_info/FFPMaskPrompts")["FFPMaskPrompts"]["python_module"].split(".", 1)[1]
    out = page.js_async("""
        const P = await import(args[0]);
        const r = {};
        r.empty = P.parseDoc('');
        r.bad = P.parseDoc('{nope');
        r.array = P.parseDoc('[1, 2]');
        let d = P.emptyDoc(100, 50);
        const d0 = d;
        d = P.addPoint(d, 0, 1, 120, -5, 1);                 // clamped into the frame
        d = P.addBox(d, 0, 2, 80, 40, 10, 5);                // corners in any order
        r.same_tiny_box = P.addBox(d, 0, 2, 5, 5, 5.5, 30) === d;
        d = P.addPoint(d, 3, 1, 10, 10, 0);
        r.untouched = JSON.stringify(d0);
        r.text = P.serializeDoc(d);
        r.roundtrip = P.serializeDoc(P.parseDoc(r.text).doc) === r.text;
        r.removed_point = P.serializeDoc(P.removeAt(d, 0, 97, 2, 4));
        r.removed_box = P.serializeDoc(P.removeAt(d, 0, 50, 20, 4));
        r.miss_is_same = P.removeAt(d, 0, 50, 49, 1) === d;
        r.cleared = P.serializeDoc(P.clearFrame(d, 0));
        r.resized = P.serializeDoc(P.resizeDoc(d, 200, 25));
        r.no_size = P.serializeDoc(P.addPoint(P.emptyDoc(), 0, 1, 0, 0, 1));
        const fit = P.fitRect(160, 96, 400, 300);
        const rect = {left: 10, top: 20, width: 800, height: 600};   // canvas shown at 2x (zoom)
        r.fit = fit;
        r.inverse = P.clientToSource(10 + (fit.x + 40 * fit.scale) * 2, 20 + (fit.y + 30 * fit.scale) * 2, rect, 400, 300, fit);
        return r;""", f"/extensions/{pack}/js/lib/ffp_prompts.js")
    assert out["empty"]["error"] is None and out["empty"]["doc"]["prompts"] == []
    assert "not valid JSON" in out["bad"]["error"] and out["bad"]["doc"]["prompts"] == []
    assert out["array"]["error"]
    assert out["untouched"] == json.dumps({"version": 1, "width": 100, "height": 50, "prompts": []}, separators=(",", ":"))
    assert out["same_tiny_box"] is True
    doc = json.loads(out["text"])
    assert doc["prompts"] == [
        {"frame": 0, "object": 1, "points": [[99, 0, 1]], "boxes": []},
        {"frame": 0, "object": 2, "points": [], "boxes": [[10, 5, 80, 40]]},
        {"frame": 3, "object": 1, "points": [[10, 10, 0]], "boxes": []},
    ]
    assert out["roundtrip"] is True
    assert [p["frame"] for p in json.loads(out["removed_point"])["prompts"]] == [0, 3]  # object 1's only point went
    assert [p["object"] for p in json.loads(out["removed_box"])["prompts"]] == [1, 1]
    assert out["miss_is_same"] is True
    assert [p["frame"] for p in json.loads(out["cleared"])["prompts"]] == [3]
    resized = json.loads(out["resized"])
    assert (resized["width"], resized["height"]) == (200, 25)
    assert resized["prompts"][1]["boxes"] == [[20, 2.5, 160, 20]]
    assert "width" not in json.loads(out["no_size"])  # unknown size: left out, the node assumes the clip's
    assert near(out["inverse"], [40, 30], 1e-6)


def test_editor_on_real_clip(shared_data, comfy_server, fresh):
    """sam2_bedroom (960x540): the documented click (210, 350) on frame 0 (the boy on the left) lands at those
    source pixels although the frame is shown about half size."""
    import shutil

    page = fresh
    shutil.copyfile(shared_data / "sam2_bedroom" / "bedroom.mp4", comfy_server.input_dir / "ffp_bedroom.mp4")
    wf = workflow(frame=0)
    wf["nodes"][0]["widgets_values"] = ["ffp_bedroom.mp4", "image"]
    page.js_async("await app.loadGraphData(args[0]);", wf)
    page.wait_for("const e = app.graph.getNodeById(3).ffpEditor; return e.image && e.image.origin === 'file';", 60)
    page.settle(2)
    st = editor_state(page)
    assert (st["image"]["w"], st["image"]["h"]) == (960, 540)
    view = View(st)
    assert view.screen_px_per_source_px < 1  # shown downscaled
    x, y = view.client(210, 350)
    page.click_at(x, y)
    page.settle(1)
    page.screenshot(SHOT_DIR / "editor_bedroom.png")
    doc = json.loads(editor_state(page)["text"])
    ((px, py, label),) = doc["prompts"][0]["points"]
    tol = 1 / view.screen_px_per_source_px  # one screen pixel, in source pixels
    assert label == 1 and abs(px - 210) <= tol and abs(py - 350) <= tol, (px, py, tol)
    assert (doc["width"], doc["height"]) == (960, 540)


def test_help_opens_from_the_node_toolbox(comfy_server, fresh, clip):
    """The frontend's own help button (selection toolbox, 'i') shows web/docs/FFPMaskPrompts.md for the node."""
    page = fresh
    page.js_async("await app.loadGraphData(args[0]);", workflow())
    page.js("app.canvas.ds.offset = [0, 150]; app.canvas.selectNode(app.graph.getNodeById(3));")
    page.settle(3)
    pos = page.wait_for("const b = document.querySelector('.selection-toolbox [data-testid=info-button]');"
                        "if (!b) return null; const r = b.getBoundingClientRect();"
                        "return r.width ? [r.left + r.width / 2, r.top + r.height / 2] : null;", 15)
    page.click_at(round(pos[0]), round(pos[1]))
    page.wait_for("return document.body.innerText.includes('Getting a frame to click on')", 15)
    page.screenshot(SHOT_DIR / "editor_help.png")
    page.click_at(round(pos[0]), round(pos[1]))  # toggles the help sidebar closed again


def test_frame_source_mapping(comfy_server, page):
    """Which /ffprop/frame query the editor makes for each upstream loader (mock graphs, no server nodes needed):
    VideoHelperSuite's skip/nth mapping, legacy Reroute nodes, and no query where the frame cannot be mapped."""
    pack = comfy_server.get("/object_info/FFPMaskPrompts")["FFPMaskPrompts"]["python_module"].split(".", 1)[1]
    out = page.js_async("""
        const { frameSource } = await import(args[0]);  // the module the frontend already loaded (same URL)
        const W = (o) => Object.entries(o).map(([name, value]) => ({ name, value }));
        function graphWith(nodes, links) {
          const g = { links, getNodeById: (id) => nodes[id] ?? null };
          for (const n of Object.values(nodes)) n.graph = g;  // as in LiteGraph: every node knows its graph
          return g;
        }
        function prompts(graph, frame) {
          return { inputs: [{ name: 'images', link: 1 }], widgets: W({ frame, prompts: '' }), graph };
        }
        const vhs = (extra) => ({ type: 'VHS_LoadVideo', mode: 0, widgets: W({ video: 'a.mp4', force_rate: 0,
          skip_first_frames: 10, select_every_nth: 2, ...extra }) });
        const r = {};
        r.vhs = frameSource(prompts(graphWith({ 7: vhs({}) }, { 1: { origin_id: 7, origin_slot: 0 } }), 3));
        r.vhs_resampled = frameSource(prompts(graphWith({ 7: vhs({ force_rate: 12 }) }, { 1: { origin_id: 7, origin_slot: 0 } }), 3));
        const reroute = { type: 'Reroute', inputs: [{ link: 2 }] };
        const load = { type: 'LoadVideo', mode: 0, widgets: W({ file: 'b.mp4', upload: 'image' }) };
        const gvc = { type: 'GetVideoComponents', mode: 0, inputs: [{ name: 'video', link: 3 }] };
        r.rerouted = frameSource(prompts(graphWith({ 5: reroute, 6: gvc, 8: load },
          { 1: { origin_id: 5, origin_slot: 0 }, 2: { origin_id: 6, origin_slot: 0 }, 3: { origin_id: 8, origin_slot: 0 } }), 4));
        r.gvc_fps = frameSource(prompts(graphWith({ 6: gvc, 8: load },
          { 1: { origin_id: 6, origin_slot: 2 }, 3: { origin_id: 8, origin_slot: 0 } }), 4));
        r.muted = frameSource(prompts(graphWith({ 7: { ...vhs({}), mode: 2 } }, { 1: { origin_id: 7, origin_slot: 0 } }), 0));
        r.other = frameSource(prompts(graphWith({ 7: { type: 'ImageScale', mode: 0, widgets: [] } },
          { 1: { origin_id: 7, origin_slot: 0 } }), 0));
        r.unlinked = frameSource({ inputs: [{ name: 'images', link: null }], widgets: W({ frame: 0 }), graph: graphWith({}, {}) });
        return r;""", f"/extensions/{pack}/js/ffp_prompt_editor.js")
    assert out["vhs"] == {"filename": "a.mp4", "type": "input", "frame": 16}  # 10 skipped + 3 * every 2nd
    assert out["vhs_resampled"] is None
    assert out["rerouted"] == {"filename": "b.mp4", "type": "input", "frame": 4}
    assert out["gvc_fps"] is None and out["muted"] is None and out["other"] is None and out["unlinked"] is None


def test_shipped_workflows_open_in_the_editor(comfy_server, fresh):
    """Every workflows/*.json with a Mask Prompts node opens with its stored prompts drawn and its JSON untouched
    (a synthetic clip of the prompts' size stands in for the workflow's video file)."""
    page = fresh
    repo = Path(__file__).resolve().parents[2]
    checked = 0
    for path in sorted((repo / "workflows").glob("*.json")):
        wf = json.loads(path.read_text())
        links = {link[0]: link for link in wf.get("links", [])}
        for node in (n for n in wf["nodes"] if n["type"] == "FFPMaskPrompts"):
            frame, text = node["widgets_values"][:2]
            # an empty editor (the user clicks first, e.g. lora_edit.json) must stay empty when opened
            doc = json.loads(text) if text else {"width": 832, "height": 480, "prompts": []}
            # the LoadVideo behind GetVideoComponents -> images
            gvc = next(n for n in wf["nodes"] if n["id"] == links[node["inputs"][0]["link"]][1])
            load = next(n for n in wf["nodes"] if n["id"] == links[gvc["inputs"][0]["link"]][1])
            source = synthetic_clip(max(frame + 1, 5), doc["height"], doc["width"], seed=1).source
            write_video(comfy_server.input_dir / load["widgets_values"][0], source, fps=8)
            page.js("app.graph.clear();")
            page.js_async("await app.loadGraphData(args[0]);", wf)
            # 1.27 opens a Missing Models dialog for the loaders' properties.models (lora_edit): close it to see the node
            page.js("document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click());")
            nid = node["id"]
            page.wait_for("const e = app.graph.getNodeById(arguments[0]).ffpEditor;"
                          "return e.image && e.image.origin === 'file';", 60, nid)
            page.settle(2)
            st = editor_state(page, nid)
            assert st["text"] == text, f"{path.name}: opening the workflow changed the prompts"
            assert not st["status"].startswith("!"), st["status"]
            view = View(st)
            page.screenshot(SHOT_DIR / f"workflow_{path.stem}.png")
            for entry in doc["prompts"]:
                for x, y, _ in entry["points"] if entry["frame"] == frame else []:
                    assert_marker_at(page, *view.client(x, y), OBJ_COLORS.get(entry["object"], (0, 0, 0)),
                                     f"{path.name} point", radius=8)
            checked += 1
    if not checked:
        pytest.skip("no workflows/*.json uses FFPMaskPrompts yet")
