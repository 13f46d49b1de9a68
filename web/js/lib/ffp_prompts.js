// Pure helpers for the FFP mask prompt editor: the JSON document in FFPMaskPrompts' `prompts` widget and the
// canvas <-> source-pixel geometry. Side-effect free (ComfyUI imports every .js under web/ as an extension).
//
// Document (the contract with nodes/masks/prompts.py), coordinates in SOURCE pixels, origin top-left:
//   {"version": 1, "width": W, "height": H,
//    "prompts": [{"frame": 0, "object": 1, "points": [[x, y, 1], [x, y, 0]], "boxes": [[x0, y0, x1, y1]]}]}
// label 1 = positive, 0 = negative; object >= 1; one entry per (frame, object).

export const VERSION = 1;

// One colour per object id (1-based; wraps after 10).
export const OBJECT_COLORS = [
  "#4cc9f0", "#f72585", "#b5e48c", "#ffb703", "#9d4edd",
  "#ff6b35", "#2ec4b6", "#e0e1dd", "#ff006e", "#06d6a0",
];

export function objectColor(object) {
  return OBJECT_COLORS[(Math.max(1, object | 0) - 1) % OBJECT_COLORS.length];
}

export function emptyDoc(width = 0, height = 0) {
  return { version: VERSION, width, height, prompts: [] };
}

// Parse the widget text. Returns {doc, error}: doc is always a usable document (empty on error), error a message
// or null. Tolerant of "" and of entries without points/boxes; never throws.
export function parseDoc(text) {
  if (text == null || String(text).trim() === "") return { doc: emptyDoc(), error: null };
  let raw;
  try {
    raw = JSON.parse(String(text));
  } catch (e) {
    return { doc: emptyDoc(), error: `prompts is not valid JSON (${e.message})` };
  }
  if (!raw || typeof raw !== "object" || Array.isArray(raw)) {
    return { doc: emptyDoc(), error: "prompts JSON must be an object {version, width, height, prompts}" };
  }
  const doc = emptyDoc(Number(raw.width) || 0, Number(raw.height) || 0);
  const list = Array.isArray(raw.prompts) ? raw.prompts : [];
  for (const p of list) {
    if (!p || typeof p !== "object") continue;
    const entry = entryFor(doc, Number(p.frame) | 0, Math.max(1, Number(p.object) | 0));
    for (const pt of Array.isArray(p.points) ? p.points : []) {
      if (Array.isArray(pt) && pt.length >= 2) entry.points.push([Number(pt[0]), Number(pt[1]), pt[2] === 0 ? 0 : 1]);
    }
    for (const b of Array.isArray(p.boxes) ? p.boxes : []) {
      if (Array.isArray(b) && b.length === 4) entry.boxes.push(b.map(Number));
    }
  }
  return { doc, error: null };
}

// Stable text: entries sorted by (frame, object), empty entries dropped, numbers rounded to 0.1 px.
export function serializeDoc(doc) {
  const r = (v) => Math.round(v * 10) / 10;
  const prompts = doc.prompts
    .filter((p) => p.points.length || p.boxes.length)
    .slice()
    .sort((a, b) => a.frame - b.frame || a.object - b.object)
    .map((p) => ({
      frame: p.frame,
      object: p.object,
      points: p.points.map(([x, y, l]) => [r(x), r(y), l]),
      boxes: p.boxes.map((b) => b.map(r)),
    }));
  // width/height 0 = not known yet (no frame shown): leave them out, the node then assumes the clip's size.
  const size = doc.width > 0 && doc.height > 0 ? { width: doc.width, height: doc.height } : {};
  return JSON.stringify({ version: VERSION, ...size, prompts });
}

export function cloneDoc(doc) {
  return {
    version: VERSION,
    width: doc.width,
    height: doc.height,
    prompts: doc.prompts.map((p) => ({
      frame: p.frame, object: p.object, points: p.points.map((q) => q.slice()), boxes: p.boxes.map((b) => b.slice()),
    })),
  };
}

// The entry for (frame, object), created when absent (mutates doc: call on a clone).
export function entryFor(doc, frame, object) {
  let e = doc.prompts.find((p) => p.frame === frame && p.object === object);
  if (!e) {
    e = { frame, object, points: [], boxes: [] };
    doc.prompts.push(e);
  }
  return e;
}

function clamp(v, lo, hi) {
  return Math.min(hi, Math.max(lo, v));
}

// Points are pixel positions inside the frame: clamped to [0, W-1] x [0, H-1] (when the size is known).
// Returns a new document.
export function addPoint(doc, frame, object, x, y, label) {
  const out = cloneDoc(doc);
  const px = out.width > 0 ? clamp(x, 0, out.width - 1) : Math.max(0, x);
  const py = out.height > 0 ? clamp(y, 0, out.height - 1) : Math.max(0, y);
  entryFor(out, frame, object).points.push([px, py, label ? 1 : 0]);
  return out;
}

// Boxes are normalised (x0 < x1, y0 < y1) and clamped to [0, W] x [0, H]. Returns a new document.
export function addBox(doc, frame, object, xa, ya, xb, yb) {
  const out = cloneDoc(doc);
  const W = out.width > 0 ? out.width : Infinity;
  const H = out.height > 0 ? out.height : Infinity;
  const box = [
    clamp(Math.min(xa, xb), 0, W), clamp(Math.min(ya, yb), 0, H),
    clamp(Math.max(xa, xb), 0, W), clamp(Math.max(ya, yb), 0, H),
  ];
  if (box[2] - box[0] < 1 || box[3] - box[1] < 1) return doc;
  entryFor(out, frame, object).boxes.push(box);
  return out;
}

// Remove the point nearest to (x, y) within `radius` source px on this frame, else the smallest box containing it.
// Returns a new document, or the same one when nothing was hit.
export function removeAt(doc, frame, x, y, radius) {
  let best = null;
  doc.prompts.forEach((p, pi) => {
    if (p.frame !== frame) return;
    p.points.forEach(([px, py], i) => {
      const d = Math.hypot(px - x, py - y);
      if (d <= radius && (!best || best.kind !== "point" || d < best.d)) best = { kind: "point", pi, i, d };
    });
  });
  if (!best) {
    doc.prompts.forEach((p, pi) => {
      if (p.frame !== frame) return;
      p.boxes.forEach(([x0, y0, x1, y1], i) => {
        const area = (x1 - x0) * (y1 - y0);
        if (x >= x0 && x <= x1 && y >= y0 && y <= y1 && (!best || area < best.d)) best = { kind: "box", pi, i, d: area };
      });
    });
  }
  if (!best) return doc;
  const out = cloneDoc(doc);
  const entry = out.prompts[best.pi];
  (best.kind === "point" ? entry.points : entry.boxes).splice(best.i, 1);
  return out;
}

export function clearFrame(doc, frame) {
  if (!doc.prompts.some((p) => p.frame === frame)) return doc;
  const out = cloneDoc(doc);
  out.prompts = out.prompts.filter((p) => p.frame !== frame);
  return out;
}

// Rescale every coordinate when the displayed frame changes size (e.g. a loader's resize); keeps relative positions.
export function resizeDoc(doc, width, height) {
  const out = cloneDoc(doc);
  if (out.width > 0 && out.height > 0 && (out.width !== width || out.height !== height)) {
    const sx = width / out.width;
    const sy = height / out.height;
    for (const p of out.prompts) {
      p.points = p.points.map(([x, y, l]) => [x * sx, y * sy, l]);
      p.boxes = p.boxes.map(([x0, y0, x1, y1]) => [x0 * sx, y0 * sy, x1 * sx, y1 * sy]);
    }
  }
  out.width = width;
  out.height = height;
  return out;
}

export function maxObject(doc) {
  return doc.prompts.reduce((m, p) => Math.max(m, p.object), 0);
}

export function framesWithPrompts(doc) {
  return [...new Set(doc.prompts.filter((p) => p.points.length || p.boxes.length).map((p) => p.frame))].sort(
    (a, b) => a - b,
  );
}

// Counts on one frame: {positive, negative, boxes}.
export function frameCounts(doc, frame) {
  const c = { positive: 0, negative: 0, boxes: 0 };
  for (const p of doc.prompts) {
    if (p.frame !== frame) continue;
    for (const q of p.points) q[2] ? c.positive++ : c.negative++;
    c.boxes += p.boxes.length;
  }
  return c;
}

// Where a srcW x srcH image sits inside a dstW x dstH canvas ("contain", centred): {x, y, w, h, scale}.
export function fitRect(srcW, srcH, dstW, dstH) {
  const scale = Math.min(dstW / srcW, dstH / srcH);
  const w = srcW * scale;
  const h = srcH * scale;
  return { x: (dstW - w) / 2, y: (dstH - h) / 2, w, h, scale };
}

// A pointer position (clientX/Y) -> source pixels. `rect` is the canvas' getBoundingClientRect() (it includes every
// CSS transform, i.e. ComfyUI's canvas zoom), canvasW/H its backing-store size, fit = fitRect(...) in backing px.
export function clientToSource(clientX, clientY, rect, canvasW, canvasH, fit) {
  const cx = ((clientX - rect.left) / rect.width) * canvasW;
  const cy = ((clientY - rect.top) / rect.height) * canvasH;
  return [(cx - fit.x) / fit.scale, (cy - fit.y) / fit.scale];
}

export function sourceToCanvas(x, y, fit) {
  return [fit.x + x * fit.scale, fit.y + y * fit.scale];
}
