// FFP keyframe strip: a row of the clip's thumbnails under the FFPKeyframes node with the keyframes marked.
// Click a thumbnail to see that frame large under the strip (a keyframe shows its edit next to the source frame,
// once the node has run) and to jump every Mask Prompts editor (FFPMaskPrompts) of the graph to that frame.
//
// Thumbnails: (a) before any run, when `source_video` comes from LoadVideo, frames are fetched one at a time from
// GET /ffprop/frame (nodes/masks/routes.py), which also gives the frame count; (b) after a run, the node's ui
// "ffp_keyframes" (nodes/keyframes/node.py strip_ui) names small PNGs in the temp folder, the edits included.
// The marked frames follow the `frame_indices` widget as you type (0-based, comma-separated).

import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_ID = "FFPKeyframes";
const INDICES = "frame_indices";
const THUMBS = 12;
const STRIP_HEIGHT = 190;

function chainCallback(object, property, callback) {
  const original = object[property];
  object[property] = function (...args) {
    const r = original?.apply(this, args);
    callback.apply(this, args);
    return r;
  };
}

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

// '0, 12;24' -> [0, 12, 24] (what nodes/keyframes/keys.py parse_indices accepts); bad parts are left out.
export function parseIndices(text) {
  return String(text ?? "")
    .split(/[,;]/)
    .map((s) => s.trim())
    .filter((s) => /^\d+$/.test(s))
    .map(Number);
}

// Evenly spaced frames of a clip of `count` frames (at most `n`), plus the keyframes, sorted and unique.
export function stripFrames(count, indices, n = THUMBS) {
  const picked = new Set(indices.filter((i) => i >= 0 && (!count || i < count)));
  const k = Math.min(n, count || 0);
  for (let i = 0; i < k; i++) picked.add(Math.round((i * (count - 1)) / Math.max(k - 1, 1)));
  return [...picked].sort((a, b) => a - b);
}

// The LoadVideo file feeding `source_video` (directly or through Reroutes), or null.
function sourceFile(node) {
  const graph = node.graph;
  let input = node.inputs?.find((i) => i.name === "source_video");
  for (let hops = 0; input && hops < 32; hops++) {
    const id = input.link;
    const link = id == null ? null : graph.getLink?.(id) ?? (graph.links instanceof Map ? graph.links.get(id) : graph.links?.[id]);
    const origin = link && graph.getNodeById(link.origin_id);
    if (!origin || origin.mode === 2 || origin.mode === 4) return null;
    if (origin.type === "Reroute") {
      input = origin.inputs?.[0];
      continue;
    }
    return origin.type === "LoadVideo" ? widgetValue(origin, "file") || null : null;
  }
  return null;
}

class KeyframeStrip {
  constructor(node) {
    this.node = node;
    this.frames = null; // clip length, when known
    this.thumbs = new Map(); // frame -> image URL of the source frame
    this.keys = new Map(); // frame -> image URL of the edited keyframe (after a run)
    this.selected = null;
    this.file = null; // the LoadVideo file feeding the node (before a run)
    this.loadedFile = null; // the file the thumbnails are of
    this.status = "";
    this.root = document.createElement("div");
    this.root.className = "ffp-keyframe-strip";
    Object.assign(this.root.style, { display: "flex", flexDirection: "column", gap: "4px", width: "100%",
      fontSize: "11px", color: "#ccc", overflow: "hidden" });
    this.row = document.createElement("div");
    Object.assign(this.row.style, { display: "flex", gap: "3px", overflowX: "auto", minHeight: "58px" });
    this.view = document.createElement("div");
    Object.assign(this.view.style, { display: "flex", gap: "6px", alignItems: "flex-start", minHeight: "0" });
    this.line = document.createElement("div");
    this.root.append(this.row, this.line, this.view);
    this.widget = node.addDOMWidget("ffp_keyframe_strip", "FFP_KEYFRAME_STRIP", this.root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => STRIP_HEIGHT,
    });
    this.widget.serialize = false;
    const w = node.widgets?.find((x) => x.name === INDICES);
    if (w) {
      const cb = w.callback;
      w.callback = (...args) => {
        const r = cb?.apply(w, args);
        this.render();
        return r;
      };
    }
  }

  indices() {
    return parseIndices(widgetValue(this.node, INDICES));
  }

  // Before a run: thumbnails through the frame route, one request at a time (the route decodes 2 at once at most).
  // One worker loop: it restarts from frame 0 when the file changes and fetches whatever frames are still missing.
  refreshSource() {
    this.file = this.ran ? null : sourceFile(this.node);
    if (!this.file) return;
    const wanted = stripFrames(this.frames, this.indices()).some((f) => !this.thumbs.has(f));
    if ((this.file !== this.loadedFile || wanted) && !this.busy) this.pump();
  }

  async getFrame(file, frame) {
    const q = new URLSearchParams({ filename: file, type: "input", subfolder: "", frame: String(frame) });
    let res = await fetch(api.apiURL(`/ffprop/frame?${q}`), { cache: "no-store" });
    for (let retry = 0; res.status === 503 && retry < 20; retry++) { // the route is busy (the editor decodes too)
      await new Promise((r) => setTimeout(r, 250 + 250 * retry));
      res = await fetch(api.apiURL(`/ffprop/frame?${q}`), { cache: "no-store" });
    }
    if (!res.ok) throw new Error((await res.json().catch(() => ({}))).error || `${res.status}`);
    const count = Number(res.headers.get("X-FFP-Frame-Count")) || null;
    return { url: URL.createObjectURL(await res.blob()), count };
  }

  async pump() {
    this.busy = true;
    try {
      for (let guard = 0; guard < 1000 && this.file && !this.ran; guard++) {
        const file = this.file;
        if (file !== this.loadedFile) {
          this.status = "loading thumbnails...";
          this.render();
          const first = await this.getFrame(file, 0);
          for (const url of this.thumbs.values()) if (url.startsWith("blob:")) URL.revokeObjectURL(url);
          this.frames = first.count ?? (await this.probeCount(file));
          this.thumbs = new Map([[0, first.url]]);
          this.loadedFile = file;
          continue;
        }
        const next = stripFrames(this.frames, this.indices()).find((f) => !this.thumbs.has(f) && !(this.failed?.has(f)));
        if (next == null) break;
        try {
          this.thumbs.set(next, (await this.getFrame(file, next)).url);
        } catch (e) {
          (this.failed ??= new Set()).add(next); // e.g. an index past the end: shown as a mark without a picture
          this.problem = `frame ${next}: ${e.message || e}`;
        }
        this.status = "";
        this.render();
      }
      this.status = "";
    } catch (e) {
      this.status = `no thumbnails yet: ${e.message || e} (run the graph once)`;
    }
    this.busy = false;
    this.render();
  }

  // The container does not state its length: ask for a frame past any end; the route's 400 names the count
  // ("... has N frame(s) ..."). It decodes the file once to find out.
  async probeCount(file) {
    const q = new URLSearchParams({ filename: file, type: "input", subfolder: "", frame: "100000000" });
    const res = await fetch(api.apiURL(`/ffprop/frame?${q}`), { cache: "no-store" });
    const m = /has (\d+) frame\(s\)/.exec((await res.json().catch(() => ({}))).error || "");
    return m ? Number(m[1]) : null;
  }

  // After a run: the node's strip data (validated indices, frame count, thumbnails in the temp folder).
  onExecuted(message) {
    const data = message?.ffp_keyframes?.[0];
    if (!data) return;
    const url = (ref) => api.apiURL(`/view?${new URLSearchParams({ filename: ref.filename, type: ref.type || "temp",
      subfolder: ref.subfolder || "" })}`);
    this.ran = true;
    this.frames = data.frames;
    this.thumbs = new Map(data.thumbs.map((t) => [t.frame, url(t)]));
    this.keys = new Map(data.keys.map((k) => [k.frame, url(k)]));
    this.status = "";
    this.render();
  }

  select(frame) {
    this.selected = frame;
    for (const n of app.graph?._nodes ?? app.graph?.nodes ?? []) {
      if (n.type !== "FFPMaskPrompts") continue;
      const w = n.widgets?.find((x) => x.name === "frame");
      if (!w) continue;
      w.value = frame;
      w.callback?.(frame);
    }
    app.graph?.setDirtyCanvas?.(true, true);
    this.render();
  }

  render() {
    const keys = new Set(this.indices());
    const frames = stripFrames(this.frames, [...keys]).filter((f) => this.thumbs.has(f) || keys.has(f));
    this.row.replaceChildren(
      ...frames.map((f) => {
        const cell = document.createElement("div");
        cell.className = "ffp-thumb" + (keys.has(f) ? " ffp-key" : "") + (f === this.selected ? " ffp-selected" : "");
        cell.dataset.frame = String(f);
        cell.title = `frame ${f} (0-based)${keys.has(f) ? ": keyframe" : ""}; click to show it and jump Mask Prompts`;
        Object.assign(cell.style, { flex: "0 0 auto", cursor: "pointer", textAlign: "center", padding: "1px",
          border: `2px solid ${keys.has(f) ? "#f7b32b" : f === this.selected ? "#4cc9f0" : "transparent"}`,
          borderRadius: "3px", background: f === this.selected ? "#334" : "transparent" });
        const src = this.keys.get(f) ?? this.thumbs.get(f);
        if (src) {
          const img = document.createElement("img");
          img.src = src;
          Object.assign(img.style, { height: "40px", display: "block" });
          cell.append(img);
        }
        const label = document.createElement("div");
        label.textContent = keys.has(f) ? `◆ ${f}` : String(f);
        cell.append(label);
        cell.addEventListener("click", (e) => {
          e.stopPropagation();
          this.select(f);
        });
        return cell;
      })
    );
    const bad = [...keys].filter((k) => this.frames && k >= this.frames);
    this.line.textContent = this.status || [
      this.frames ? `${this.frames} frames` : "clip length unknown",
      `keyframes: ${[...keys].join(", ") || "none"}`,
      bad.length ? `past the clip's end: ${bad.join(", ")}` : "",
      this.problem && !this.ran ? `not shown: ${this.problem}` : "",
      this.selected != null ? `showing frame ${this.selected}` : "click a frame to see it",
    ].filter(Boolean).join(" · ");
    const shown = [];
    if (this.selected != null) {
      for (const [url, what] of [[this.thumbs.get(this.selected), "source"], [this.keys.get(this.selected), "edit"]]) {
        if (!url) continue;
        const img = document.createElement("img");
        img.src = url;
        img.className = `ffp-view-${what}`;
        img.title = `frame ${this.selected}: ${what}`;
        Object.assign(img.style, { height: "96px", imageRendering: "auto" });
        shown.push(img);
      }
    }
    this.view.replaceChildren(...shown);
  }
}

app.registerExtension({
  name: "FFP.KeyframeStrip",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;
    chainCallback(nodeType.prototype, "onNodeCreated", function () {
      this.ffpStrip = new KeyframeStrip(this);
      const [w, h] = this.size;
      this.setSize([Math.max(w, 420), Math.max(h, 360)]);
    });
    chainCallback(nodeType.prototype, "onConfigure", function () {
      this.ffpStrip?.refreshSource();
    });
    chainCallback(nodeType.prototype, "onConnectionsChange", function () {
      this.ffpStrip?.refreshSource();
    });
    chainCallback(nodeType.prototype, "onExecuted", function (message) {
      this.ffpStrip?.onExecuted(message);
    });
    // the loader's file or the indices change without telling this node: compare on every draw (cheap)
    chainCallback(nodeType.prototype, "onDrawForeground", function () {
      this.ffpStrip?.refreshSource();
    });
  },
});
