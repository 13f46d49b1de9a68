"""The keyframe strip (web/js/ffp_keyframes.js) in a real browser on the real ComfyUI frontend and server.

Graph: LoadVideo -> FFPKeyframes (edit of frame 6 from LoadImage) -> FFPKeyframePropagate (flow) -> PreviewImage,
and LoadVideo -> GetVideoComponents -> FFPMaskPrompts beside it. Checked: before any run the strip shows the
clip's thumbnails through GET /ffprop/frame with the frame count and keyframe 6 marked; typing indices moves the
marks; a real click on a thumbnail shows that frame large (the route's full frame) and jumps the Mask Prompts
editor to it (its frame widget and the frame it fetches); after a run from the frontend the strip shows the run's
thumbnails and the edited keyframe next to its source frame; the help page is where the frontend looks.
Skips with the reason when COMFYUI_DIR is unset, or Chromium/chromedriver/selenium are missing.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
from ffprop.nodes.video.io import write_image, write_video
from ffprop.nodes.video.synthetic import synthetic_clip

CLIP = "ffp_keyframes_clip.mp4"
EDIT = "ffp_keyframes_edit6.png"
T, H, W = 9, 96, 160
SHOT_DIR = Path(os.environ.get("FFP_E2E_SHOTS", "/tmp/ffp_web_editor_shots"))


@pytest.fixture(scope="module")
def page(comfy_server, browser):
    from e2e_browser import post_settings

    clip = synthetic_clip(T, H, W, seed=4)
    write_video(comfy_server.input_dir / CLIP, clip.source, fps=8)
    write_image(comfy_server.input_dir / EDIT, clip.edited[6])
    base = comfy_server.url("")
    post_settings(base, {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
    browser.open_comfy(base)
    browser.wait_for("return app.extensions.some((e) => e.name === 'FFP.KeyframeStrip')", 30)
    browser.js("document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click());"
               "app.graph.clear(); app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];")
    browser.settle(2)
    return browser


def workflow(indices: str = "6") -> dict:
    def node(id_, type_, pos, size, inputs, outputs, widgets):
        return {"id": id_, "type": type_, "pos": pos, "size": size, "flags": {}, "order": id_ - 1, "mode": 0,
                "inputs": inputs, "outputs": outputs, "properties": {}, "widgets_values": widgets}

    opt = {"shape": 7}
    return {
        "last_node_id": 7, "last_link_id": 7, "groups": [], "config": {}, "version": 0.4,
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
        "links": [[1, 1, 0, 2, 0, "VIDEO"], [2, 3, 0, 2, 1, "IMAGE"], [3, 1, 0, 4, 0, "VIDEO"],
                  [4, 4, 0, 5, 0, "IMAGE"], [5, 1, 0, 6, 0, "VIDEO"], [6, 2, 0, 6, 1, "FFP_KEYFRAMES"],
                  [7, 6, 1, 7, 0, "IMAGE"]],
        "nodes": [
            node(1, "LoadVideo", [20, 40], [300, 330], [], [{"name": "VIDEO", "type": "VIDEO", "links": [1, 3, 5]}],
                 [CLIP, "image"]),
            node(2, "FFPKeyframes", [360, 40], [520, 420],
                 [{"name": "source_video", "type": "VIDEO", "link": 1}, {"name": "images", "type": "IMAGE", "link": 2},
                  {"name": "keyframes", "type": "FFP_KEYFRAMES", "link": None, **opt},
                  {"name": "edit_mask", "type": "MASK", "link": None, **opt}],
                 [{"name": "keyframes", "type": "FFP_KEYFRAMES", "links": [6]},
                  {"name": "report", "type": "STRING", "links": None}], [indices, "auto", 0.08]),
            node(3, "LoadImage", [20, 420], [300, 320], [], [{"name": "IMAGE", "type": "IMAGE", "links": [2]},
                                                            {"name": "MASK", "type": "MASK", "links": None}],
                 [EDIT, "image"]),
            node(4, "GetVideoComponents", [20, 780], [260, 110], [{"name": "video", "type": "VIDEO", "link": 3}],
                 [{"name": "images", "type": "IMAGE", "links": [4]}, {"name": "audio", "type": "AUDIO", "links": None},
                  {"name": "fps", "type": "FLOAT", "links": None}], []),
            node(5, "FFPMaskPrompts", [360, 500], [480, 420], [{"name": "images", "type": "IMAGE", "link": 4}],
                 [{"name": "prompts", "type": "FFP_MASK_PROMPTS", "links": None}], [0, ""]),
            node(6, "FFPKeyframePropagate", [920, 40], [340, 520],
                 [{"name": "source_video", "type": "VIDEO", "link": 5},
                  {"name": "keyframes", "type": "FFP_KEYFRAMES", "link": 6},
                  *({"name": n, "type": t, "link": None, **opt} for n, t in
                    (("edit_mask", "MASK"), ("model", "MODEL"), ("vae", "VAE"), ("positive", "CONDITIONING"),
                     ("negative", "CONDITIONING")))],
                 [{"name": "video", "type": "VIDEO", "links": None}, {"name": "frames", "type": "IMAGE", "links": [7]},
                  {"name": "edit_mask", "type": "MASK", "links": None}, {"name": "confidence", "type": "MASK",
                                                                         "links": None},
                  {"name": "report", "type": "STRING", "links": None}],
                 ["flow", 81, 30, 5.0, 0, "fixed", "euler", "simple", True, 2048]),
            node(7, "PreviewImage", [920, 600], [320, 300], [{"name": "images", "type": "IMAGE", "link": 7}], [], []),
        ],
    }


STATE = """const s = app.graph.getNodeById(2).ffpStrip;
  const cells = [...s.row.querySelectorAll('.ffp-thumb')];
  return {frames: s.frames, ran: !!s.ran, status: s.line.textContent, thumbs: s.thumbs.size, keys: [...s.keys.keys()],
          cells: cells.map((c) => Number(c.dataset.frame)),
          marked: cells.filter((c) => c.classList.contains('ffp-key')).map((c) => Number(c.dataset.frame)),
          loaded: cells.every((c) => { const i = c.querySelector('img'); return i && i.complete && i.naturalWidth > 0; }),
          view: [...s.view.querySelectorAll('img')].map((i) => ({cls: i.className, w: i.naturalWidth,
                                                               h: i.naturalHeight, ok: i.complete}))};"""


def wait_state(page, condition: str, timeout: float) -> dict:
    """The strip's state once the JS `condition` on it (`r`) holds; on timeout the error shows the last state."""
    try:
        return page.wait_for(f"const r = (() => {{ {STATE} }})(); return ({condition}) ? r : null;", timeout)
    except TimeoutError:
        raise AssertionError(f"strip never got to `{condition}`: {page.js(STATE)}; console: {page.console()[-8:]}") from None


def click_cell(page, frame: int) -> None:
    r = page.js("""const c = app.graph.getNodeById(2).ffpStrip.row.querySelector(`[data-frame="${arguments[0]}"]`);
                   c.scrollIntoView({block: 'nearest', inline: 'nearest'});
                   const r = c.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2];""", frame)
    page.click_at(round(r[0]), round(r[1]))
    page.settle(1)


def test_strip_marks_keyframes_jumps_mask_prompts_and_shows_the_run(comfy_server, page):
    SHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.js_async("await app.loadGraphData(args[0]);", workflow("6"))
    page.settle()
    st = wait_state(page, f"r.thumbs >= {T} && r.loaded", 240)
    assert st["frames"] == T and st["cells"] == list(range(T)), st
    assert st["marked"] == [6] and not st["ran"]
    assert f"{T} frames" in st["status"] and "keyframes: 6" in st["status"]

    # typing indices moves the marks at once (no run)
    page.js("const w = app.graph.getNodeById(2).widgets.find((w) => w.name === 'frame_indices');"
            "w.value = '2, 6'; w.callback?.(w.value);")
    page.settle(1)
    assert page.js(f"return (() => {{ {STATE} }})().marked") == [2, 6]
    page.js("const w = app.graph.getNodeById(2).widgets.find((w) => w.name === 'frame_indices');"
            "w.value = '6'; w.callback?.(w.value);")
    page.settle(1)

    # a real click on frame 4: shown large (the route's full frame) and the Mask Prompts editor jumps there
    click_cell(page, 4)
    page.wait_for("const e = app.graph.getNodeById(5).ffpEditor; return e.image && e.image.frame === 4 "
                  "&& e.image.origin === 'file';", 30)
    assert page.js("return app.graph.getNodeById(5).widgets.find((w) => w.name === 'frame').value") == 4
    st = wait_state(page, "r.view.length && r.view[0].ok", 15)
    assert st["view"][0]["cls"] == "ffp-view-source" and (st["view"][0]["w"], st["view"][0]["h"]) == (W, H)
    assert "showing frame 4" in st["status"]
    page.screenshot(SHOT_DIR / "keyframes_strip_before_run.png")

    # run from the frontend: the strip switches to the run's thumbnails, keyframe 6 shows its edit
    before = set(comfy_server.get("/history"))
    page.js_async("await app.queuePrompt(0, 1);")
    wait_state(page, "r.ran", 180)
    deadline = time.perf_counter() + 180
    while not (new := set(history := comfy_server.get("/history")) - before) and time.perf_counter() < deadline:
        time.sleep(0.2)
    (entry,) = (history[k] for k in new)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
    report = entry["outputs"]["2"]["text"][0]
    assert "1 keyframe(s) at frame(s) 6 of 9" in report
    st = wait_state(page, "r.loaded", 30)
    assert st["keys"] == [6] and st["marked"] == [6] and st["cells"] == list(range(T))
    click_cell(page, 6)
    st = wait_state(page, "r.view.length === 2 && r.view.every((v) => v.ok)", 15)
    assert [v["cls"] for v in st["view"]] == ["ffp-view-source", "ffp-view-edit"]
    differ = page.js_async("""const imgs = [...app.graph.getNodeById(2).ffpStrip.view.querySelectorAll('img')];
        const px = imgs.map((img) => { const c = document.createElement('canvas'); c.width = img.naturalWidth;
          c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);
          return g.getImageData(0, 0, c.width, c.height).data; });
        let d = 0; for (let i = 0; i < px[0].length; i++) d = Math.max(d, Math.abs(px[0][i] - px[1][i]));
        return d;""")
    assert differ > 60, f"the edited keyframe looks like its source frame (max difference {differ})"
    assert page.js("return app.graph.getNodeById(5).widgets.find((w) => w.name === 'frame').value") == 6
    page.screenshot(SHOT_DIR / "keyframes_strip_after_run.png")


def test_help_pages_are_served_where_the_frontend_looks(comfy_server):
    for node_id, words in (("FFPKeyframes", b"frame_indices"), ("FFPKeyframePropagate", b"confidence")):
        info = comfy_server.get(f"/object_info/{node_id}")[node_id]
        pack = info["python_module"].split(".", 1)[1]
        with urllib.request.urlopen(comfy_server.url(f"/extensions/{pack}/docs/{node_id}.md"), timeout=30) as r:  # noqa: S310
            assert r.status == 200 and words in r.read()
