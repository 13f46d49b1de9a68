// FFP mask prompt editor: a canvas on the FFPMaskPrompts node that shows the chosen frame of the connected clip and
// turns clicks into SAM2 prompts, stored as JSON in the node's (hidden) `prompts` STRING widget. Because that is an
// ordinary widget value, prompts travel with the workflow (save/load, copy/paste, undo, API export).
//
// Gestures (also in web/docs/FFPMaskPrompts.md): left click = positive point, right click or shift+click = negative
// point, left drag = box, ctrl/cmd/alt+click = delete the nearest point (or the box under the pointer); buttons pick
// the object id (colours per object), undo, clear the frame.
//
// Frame source: (a) when `images` comes from LoadVideo -> GetVideoComponents, LoadImage or VHS_LoadVideo, the frame
// is fetched from GET /ffprop/frame (nodes/masks/routes.py) as soon as the graph is wired; (b) after a run, the clean
// frame the node returns (ui "images") is shown. Coordinates are always SOURCE pixels of that frame.

import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import * as P from "./lib/ffp_prompts.js";

const NODE_ID = "FFPMaskPrompts";
const PROMPTS = "prompts";
const FRAME = "frame";
const IMAGES = "images";
const DRAG_PX = 5; // pointer travel (screen px) that turns a click into a box
const HIT_PX = 10; // delete radius (screen px)
const UNDO_LIMIT = 200;
const MIN_EDITOR_HEIGHT = 180;
const HINT_NO_FRAME = "No frame yet: run the graph once, or connect a LoadVideo (via GetVideoComponents) or a LoadImage.";

function chainCallback(object, property, callback) {
  const original = object[property];
  object[property] = function (...args) {
    const r = original?.apply(this, args);
    callback.apply(this, args);
    return r;
  };
}

function getLink(graph, id) {
  if (id == null || !graph) return null;
  const links = graph.links;
  return graph.getLink?.(id) ?? (links instanceof Map ? links.get(id) : links?.[id]) ?? null;
}

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

// The upstream origin (node, slot) of an input, following legacy Reroute nodes.
function upstream(node, inputName) {
  const graph = node.graph;
  let input = node.inputs?.find((i) => i.name === inputName);
  for (let hops = 0; input && hops < 32; hops++) {
    const link = getLink(graph, input.link);
    if (!link) return null;
    const origin = graph.getNodeById(link.origin_id);
    if (!origin) return null;
    if (origin.type === "Reroute") {
      input = origin.inputs?.[0];
      continue;
    }
    return { node: origin, slot: link.origin_slot };
  }
  return null;
}

// Where the `images` input comes from, as a /ffprop/frame query for the node's frame, or null when the frame can
// only come from a run (images computed by other nodes, or a loader whose frame mapping is not 1:1).
export function frameSource(node) {
  const up = upstream(node, IMAGES);
  if (!up) return null;
  const frame = Math.max(0, Number(widgetValue(node, FRAME)) | 0);
  const { node: src, slot } = up;
  if (src.mode === 2 || src.mode === 4) return null; // muted / bypassed
  if (src.type === "GetVideoComponents" && slot === 0) {
    const video = upstream(src, "video");
    if (video?.node.type === "LoadVideo") {
      const file = widgetValue(video.node, "file");
      if (file) return { filename: String(file), type: "input", frame };
    }
    return null;
  }
  if (src.type === "LoadImage" && slot === 0) {
    const file = widgetValue(src, "image");
    return file ? { filename: String(file), type: "input", frame } : null;
  }
  if (src.type === "VHS_LoadVideo" && slot === 0) {
    const file = widgetValue(src, "video");
    if (!file || Number(widgetValue(src, "force_rate") || 0) !== 0) return null; // resampled: not 1:1
    const skip = Number(widgetValue(src, "skip_first_frames") || 0) | 0;
    const nth = Math.max(1, Number(widgetValue(src, "select_every_nth") || 1) | 0);
    return { filename: String(file), type: "input", frame: skip + frame * nth };
  }
  return null;
}

class PromptEditor {
  constructor(node) {
    this.node = node;
    this.doc = P.emptyDoc();
    this.text = "";
    this.undo = [];
    this.object = 1;
    this.image = null; // {img, width, height, origin: "file"|"run", key, frame}
    this.sourceKey = null;
    this.fetchSeq = 0;
    this.status = "";
    this.error = null;
    this.drag = null;
    this.pointer = null; // last hover position in source px (crosshair)
    this.promptsWidget = node.widgets?.find((w) => w.name === PROMPTS);
    this.buildDom();
    this.hookPromptsWidget();
    const frameWidget = node.widgets?.find((w) => w.name === FRAME);
    if (frameWidget) {
      const cb = frameWidget.callback;
      frameWidget.callback = (...args) => {
        const r = cb?.apply(frameWidget, args);
        this.refreshSource();
        this.render();
        return r;
      };
    }
    this.widget = node.addDOMWidget("ffp_prompt_editor", "FFP_PROMPT_EDITOR", this.root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => MIN_EDITOR_HEIGHT,
    });
    this.widget.serialize = false; // not in widgets_values either (LGraphNode.serialize reads the widget's own flag)
    this.loadFromWidget();
  }

  // ---- the hidden JSON widget ---------------------------------------------------------------------------------
  hookPromptsWidget() {
    const w = this.promptsWidget;
    if (!w) {
      this.error = `this ${NODE_ID} node has no '${PROMPTS}' widget (is the pack up to date?)`;
      return;
    }
    w.hidden = true; // drawn by nobody...
    w.computeSize = () => [0, -4]; // ...and takes no height in the node layout
    // Catch every write to the value (workflow load, paste, undo, a script) so the canvas always shows the JSON.
    let value = w.value;
    const editor = this;
    Object.defineProperty(w, "value", {
      configurable: true,
      enumerable: true,
      get() {
        return value;
      },
      set(v) {
        value = v;
        if (v !== editor.text) editor.loadFromWidget();
      },
    });
  }

  loadFromWidget() {
    const text = this.promptsWidget?.value ?? "";
    const { doc, error } = P.parseDoc(text);
    // JSON without a size (hand-written, or "") is in the shown frame's pixels: adopt its size in memory only
    if (!(doc.width > 0 && doc.height > 0) && this.image) Object.assign(doc, { width: this.image.width, height: this.image.height });
    this.doc = doc;
    this.text = text;
    this.error = error;
    this.object = Math.max(1, Math.min(this.object, Math.max(P.maxObject(doc), 1) + 1));
    this.renderToolbar();
    this.render();
  }

  commit(doc) {
    if (doc === this.doc) return;
    this.undo.push(this.text);
    if (this.undo.length > UNDO_LIMIT) this.undo.shift();
    this.setDoc(doc);
  }

  setDoc(doc) {
    this.doc = doc;
    this.text = P.serializeDoc(doc);
    this.error = null;
    if (this.promptsWidget) this.promptsWidget.value = this.text; // the setter sees text === this.text: no reload
    this.node.setDirtyCanvas?.(true, true);
    this.renderToolbar();
    this.render();
  }

  // Back to the exact previous text ("" stays "", so an untouched node serialises as before).
  undoLast() {
    if (!this.undo.length) return;
    const text = this.undo.pop();
    this.text = null; // makes the widget setter reload (loadFromWidget) with the restored text
    if (this.promptsWidget) this.promptsWidget.value = text;
    else this.loadFromWidget();
    this.node.setDirtyCanvas?.(true, true);
  }

  // ---- DOM ----------------------------------------------------------------------------------------------------
  buildDom() {
    const root = document.createElement("div");
    root.className = "ffp-prompt-editor";
    Object.assign(root.style, {
      display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
      boxSizing: "border-box", font: "12px sans-serif", color: "#ddd", userSelect: "none",
    });
    const bar = document.createElement("div");
    Object.assign(bar.style, { display: "flex", flexWrap: "wrap", alignItems: "center", gap: "3px" });
    const wrap = document.createElement("div");
    Object.assign(wrap.style, { flex: "1 1 auto", minHeight: "60px", position: "relative", overflow: "hidden" });
    const canvas = document.createElement("canvas");
    canvas.className = "ffp-prompt-canvas";
    Object.assign(canvas.style, {
      position: "absolute", left: "0", top: "0", width: "100%", height: "100%", cursor: "crosshair",
      touchAction: "none", borderRadius: "4px",
    });
    wrap.appendChild(canvas);
    const status = document.createElement("div");
    status.className = "ffp-prompt-status";
    Object.assign(status.style, { minHeight: "14px", whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
    root.append(bar, wrap, status);
    this.root = root;
    this.bar = bar;
    this.wrap = wrap;
    this.canvas = canvas;
    this.statusEl = status;

    canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    canvas.addEventListener("pointercancel", () => {
      this.drag = null;
      this.render();
    });
    canvas.addEventListener("pointerleave", () => {
      this.pointer = null;
      this.render();
    });
    canvas.addEventListener("contextmenu", (e) => {
      e.preventDefault(); // right click = negative point, not the browser or LiteGraph menu
      e.stopPropagation();
    });
    this.resizeObserver = new ResizeObserver(() => this.render());
    this.resizeObserver.observe(wrap);
    this.renderToolbar();
  }

  button(label, title, onClick, style = {}) {
    const b = document.createElement("button");
    b.textContent = label;
    b.title = title;
    Object.assign(b.style, {
      padding: "1px 6px", minWidth: "22px", border: "1px solid #555", borderRadius: "4px", background: "#333",
      color: "#ddd", cursor: "pointer", font: "12px sans-serif", ...style,
    });
    b.addEventListener("click", (e) => {
      e.stopPropagation();
      onClick(e);
    });
    return b;
  }

  renderToolbar() {
    if (!this.bar) return;
    this.bar.replaceChildren();
    const label = document.createElement("span");
    label.textContent = "object";
    label.style.marginRight = "2px";
    this.bar.appendChild(label);
    const count = Math.max(P.maxObject(this.doc), this.object, 1);
    for (let id = 1; id <= count; id++) {
      const active = id === this.object;
      const b = this.button(String(id), `Prompts go to object ${id}`, () => this.selectObject(id), {
        background: active ? P.objectColor(id) : "#333",
        color: active ? "#111" : P.objectColor(id),
        borderColor: P.objectColor(id),
        fontWeight: active ? "bold" : "normal",
      });
      b.dataset.ffpObject = String(id);
      this.bar.appendChild(b);
    }
    const add = this.button("+", "New object id", () => this.selectObject(count + 1));
    add.dataset.ffpAction = "new-object";
    const undo = this.button("Undo", "Undo the last change", () => this.undoLast(), { marginLeft: "8px" });
    undo.dataset.ffpAction = "undo";
    undo.disabled = !this.undo.length;
    undo.style.opacity = this.undo.length ? "1" : "0.5";
    const clear = this.button("Clear", "Remove every prompt on this frame", () => this.commit(P.clearFrame(this.doc, this.frame())));
    clear.dataset.ffpAction = "clear";
    this.bar.append(add, undo, clear);
  }

  selectObject(id) {
    this.object = id;
    this.renderToolbar();
    this.render();
  }

  frame() {
    return Math.max(0, Number(widgetValue(this.node, FRAME)) | 0);
  }

  // ---- frame source -------------------------------------------------------------------------------------------
  refreshSource() {
    let src = null;
    try {
      src = frameSource(this.node);
    } catch (e) {
      src = null;
    }
    const key = src ? JSON.stringify(src) : null;
    if (key === this.sourceKey) return;
    this.sourceKey = key;
    if (src) this.fetchFrame(src, key);
    else this.render();
  }

  async fetchFrame(src, key) {
    const seq = ++this.fetchSeq;
    const q = new URLSearchParams({ filename: src.filename, type: src.type, subfolder: "", frame: String(src.frame) });
    this.status = "loading frame...";
    this.render();
    try {
      const res = await fetch(api.apiURL(`/ffprop/frame?${q}`), { cache: "no-store" });
      if (seq !== this.fetchSeq) return;
      if (!res.ok) {
        let msg = `${res.status} ${res.statusText}`;
        try {
          msg = (await res.json()).error || msg;
        } catch (e) {
          /* not JSON */
        }
        this.status = `frame not available: ${msg}`;
        this.image = null; // never let clicks for this frame land on another frame's picture
        this.render();
        return;
      }
      const blob = await res.blob();
      const img = await loadImage(URL.createObjectURL(blob));
      if (seq !== this.fetchSeq) return;
      this.status = "";
      this.setImage(img, "file", key);
    } catch (e) {
      if (seq === this.fetchSeq) {
        this.status = `frame not available: ${e.message || e}`;
        this.image = null;
        this.render();
      }
    }
  }

  async onExecuted(message) {
    const info = message?.images?.[0];
    if (!info) return;
    const q = new URLSearchParams({ filename: info.filename, type: info.type || "temp", subfolder: info.subfolder || "" });
    try {
      const img = await loadImage(api.apiURL(`/view?${q}&rand=${Math.random()}`));
      this.setImage(img, "run", this.sourceKey);
    } catch (e) {
      this.status = `cannot show the executed frame: ${e.message || e}`;
      this.render();
    }
  }

  setImage(img, origin, key) {
    if (this.image?.url?.startsWith("blob:") && this.image.url !== img.src) URL.revokeObjectURL(this.image.url);
    const width = img.naturalWidth;
    const height = img.naturalHeight;
    this.image = { img, url: img.src, width, height, origin, key, frame: this.frame() };
    if (this.doc.width !== width || this.doc.height !== height) {
      const hasPrompts = this.doc.prompts.some((p) => p.points.length || p.boxes.length);
      const resized = P.resizeDoc(this.doc, width, height);
      // Same clip shown at another size (e.g. a loader's resize): keep prompts where they were, relative to the
      // frame (an undoable change). Without prompts only the in-memory size changes: opening a workflow must not
      // modify it.
      if (hasPrompts && this.doc.width > 0 && this.doc.height > 0) this.commit(resized);
      else this.doc = resized;
    }
    this.render();
  }

  // ---- pointer ------------------------------------------------------------------------------------------------
  geometry() {
    const c = this.canvas;
    if (!this.image) return null;
    return P.fitRect(this.image.width, this.image.height, c.width, c.height);
  }

  toSource(e) {
    const fit = this.geometry();
    if (!fit) return null;
    return P.clientToSource(e.clientX, e.clientY, this.canvas.getBoundingClientRect(), this.canvas.width,
      this.canvas.height, fit);
  }

  // source px per screen px, for hit radii and the drag threshold
  sourcePerScreenPx() {
    const fit = this.geometry();
    const rect = this.canvas.getBoundingClientRect();
    if (!fit || !rect.width) return 1;
    return this.canvas.width / rect.width / fit.scale;
  }

  inside([x, y]) {
    return x >= 0 && y >= 0 && x <= this.image.width && y <= this.image.height;
  }

  onPointerDown(e) {
    if (!this.image || (e.button !== 0 && e.button !== 2)) return; // middle button: leave it to the canvas
    const pos = this.toSource(e);
    if (!pos || !this.inside(pos)) return;
    e.stopPropagation();
    this.canvas.setPointerCapture?.(e.pointerId);
    this.drag = {
      start: pos, end: pos, x0: e.clientX, y0: e.clientY, button: e.button,
      negative: e.button === 2 || e.shiftKey, remove: e.ctrlKey || e.metaKey || e.altKey, moved: false,
    };
  }

  onPointerMove(e) {
    if (!this.image) return;
    const pos = this.toSource(e);
    this.pointer = pos && this.inside(pos) ? pos : null;
    if (this.drag) {
      this.drag.end = pos;
      if (Math.hypot(e.clientX - this.drag.x0, e.clientY - this.drag.y0) > DRAG_PX) this.drag.moved = true;
    }
    this.render();
  }

  onPointerUp(e) {
    const d = this.drag;
    this.drag = null;
    if (!d || !this.image) return;
    this.canvas.releasePointerCapture?.(e.pointerId);
    const end = this.toSource(e) ?? d.end;
    const frame = this.frame();
    if (d.remove) {
      this.commit(P.removeAt(this.doc, frame, d.start[0], d.start[1], HIT_PX * this.sourcePerScreenPx()));
    } else if (d.negative) {
      this.commit(P.addPoint(this.doc, frame, this.object, d.start[0], d.start[1], 0));
    } else if (d.button === 0 && d.moved) {
      this.commit(P.addBox(this.doc, frame, this.object, d.start[0], d.start[1], end[0], end[1]));
    } else if (d.button === 0) {
      this.commit(P.addPoint(this.doc, frame, this.object, d.start[0], d.start[1], 1));
    }
    this.render();
  }

  // ---- drawing ------------------------------------------------------------------------------------------------
  render() {
    const c = this.canvas;
    if (!c) return;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(this.wrap.clientWidth * dpr));
    const h = Math.max(1, Math.round(this.wrap.clientHeight * dpr));
    if (c.width !== w || c.height !== h) {
      c.width = w;
      c.height = h;
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#1b1b1b";
    ctx.fillRect(0, 0, w, h);
    const frame = this.frame();
    const fit = this.geometry();
    if (!fit) {
      this.drawHint(ctx, w, h, dpr, this.status || HINT_NO_FRAME);
      this.renderStatus(frame);
      return;
    }
    ctx.imageSmoothingEnabled = fit.scale < 1;
    ctx.drawImage(this.image.img, fit.x, fit.y, fit.w, fit.h);
    const stale = this.image.origin === "run" && this.image.frame !== frame && !this.sourceKey;
    if (stale) {
      ctx.fillStyle = "rgba(0,0,0,0.45)";
      ctx.fillRect(fit.x, fit.y, fit.w, fit.h);
    }
    const r = 5 * dpr;
    for (const p of this.doc.prompts) {
      if (p.frame !== frame) continue;
      const color = P.objectColor(p.object);
      for (const [x0, y0, x1, y1] of p.boxes) {
        const [ax, ay] = P.sourceToCanvas(x0, y0, fit);
        const [bx, by] = P.sourceToCanvas(x1, y1, fit);
        ctx.fillStyle = color + "22";
        ctx.fillRect(ax, ay, bx - ax, by - ay);
        ctx.strokeStyle = color;
        ctx.lineWidth = 2 * dpr;
        ctx.strokeRect(ax, ay, bx - ax, by - ay);
      }
      for (const [x, y, label] of p.points) {
        const [cx, cy] = P.sourceToCanvas(x, y, fit);
        ctx.beginPath();
        ctx.arc(cx, cy, r, 0, Math.PI * 2);
        ctx.fillStyle = label ? color : "#111";
        ctx.fill();
        ctx.lineWidth = 2 * dpr;
        ctx.strokeStyle = label ? "#fff" : color;
        ctx.stroke();
        ctx.beginPath(); // + or - sign
        ctx.moveTo(cx - r * 0.55, cy);
        ctx.lineTo(cx + r * 0.55, cy);
        if (label) {
          ctx.moveTo(cx, cy - r * 0.55);
          ctx.lineTo(cx, cy + r * 0.55);
        }
        ctx.lineWidth = 1.5 * dpr;
        ctx.strokeStyle = label ? "#111" : "#fff";
        ctx.stroke();
      }
    }
    const d = this.drag;
    if (d && d.moved && !d.negative && !d.remove && d.button === 0 && d.end) {
      const [ax, ay] = P.sourceToCanvas(d.start[0], d.start[1], fit);
      const [bx, by] = P.sourceToCanvas(d.end[0], d.end[1], fit);
      ctx.setLineDash([6 * dpr, 4 * dpr]);
      ctx.strokeStyle = P.objectColor(this.object);
      ctx.lineWidth = 1.5 * dpr;
      ctx.strokeRect(ax, ay, bx - ax, by - ay);
      ctx.setLineDash([]);
    }
    if (stale) this.drawHint(ctx, w, h, dpr, `showing frame ${this.image.frame} from the last run: run the graph for frame ${frame}`);
    this.renderStatus(frame);
  }

  drawHint(ctx, w, h, dpr, text) {
    ctx.fillStyle = "#aaa";
    ctx.font = `${12 * dpr}px sans-serif`;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    const words = text.split(" ");
    const lines = [];
    let line = "";
    for (const word of words) {
      const next = line ? `${line} ${word}` : word;
      if (ctx.measureText(next).width > w * 0.9 && line) {
        lines.push(line);
        line = word;
      } else line = next;
    }
    if (line) lines.push(line);
    const lh = 16 * dpr;
    lines.forEach((l, i) => ctx.fillText(l, w / 2, h / 2 + (i - (lines.length - 1) / 2) * lh));
  }

  renderStatus(frame) {
    if (!this.statusEl) return;
    let text;
    if (this.error) text = `! ${this.error}`;
    else if (this.image) {
      const c = P.frameCounts(this.doc, frame);
      const frames = P.framesWithPrompts(this.doc);
      const where = this.pointer ? `  (${Math.round(this.pointer[0])}, ${Math.round(this.pointer[1])})` : "";
      text = `frame ${frame} · ${this.image.width}x${this.image.height} · +${c.positive} −${c.negative} ▭${c.boxes}`
        + (frames.length ? ` · prompted frames: ${frames.join(", ")}` : "") + where;
      if (this.status) text = `${this.status} · ${text}`;
    } else if (P.framesWithPrompts(this.doc).length) {
      text = `prompts saved on frame(s) ${P.framesWithPrompts(this.doc).join(", ")}; they show once a frame is available`;
    } else text = this.status || "left: + point · right/shift: − point · drag: box · ctrl: delete";
    this.statusEl.textContent = text;
    this.statusEl.style.color = this.error ? "#ff8080" : "#bbb";
  }

  remove() {
    this.resizeObserver?.disconnect();
    if (this.image?.url?.startsWith("blob:")) URL.revokeObjectURL(this.image.url);
  }
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot load image ${url}`));
    img.src = url;
  });
}

app.registerExtension({
  name: "FFP.MaskPromptEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;

    chainCallback(nodeType.prototype, "onNodeCreated", function () {
      this.ffpEditor = new PromptEditor(this);
      const [w, h] = this.size;
      this.setSize([Math.max(w, 360), Math.max(h, 420)]);
    });
    // widgets_values are restored in configure(): re-read the JSON (the value setter does too; this covers
    // frontends that assign widget values without going through the setter) and look for the frame source.
    chainCallback(nodeType.prototype, "onConfigure", function () {
      this.ffpEditor?.loadFromWidget();
      this.ffpEditor?.refreshSource();
    });
    chainCallback(nodeType.prototype, "onExecuted", function (message) {
      this.ffpEditor?.onExecuted(message);
    });
    chainCallback(nodeType.prototype, "onConnectionsChange", function () {
      this.ffpEditor?.refreshSource();
    });
    chainCallback(nodeType.prototype, "onRemoved", function () {
      this.ffpEditor?.remove();
    });
    // Upstream widgets (the loader's file, VHS skip/nth) change without telling this node: compare the source key
    // whenever the canvas draws this node (cheap: a few property reads).
    chainCallback(nodeType.prototype, "onDrawForeground", function () {
      this.ffpEditor?.refreshSource();
    });
    // The stock onDrawBackground adds an image-preview widget for ui "images"; the editor already shows that frame
    // (with the prompts over it), so this node type does not get the duplicate preview. Deliberately not chained.
    nodeType.prototype.onDrawBackground = function () {};
  },
});
