// Viewer for one job: the slice with window/level, mask and saliency overlays, findings and
// downloads. All image bytes are fetched with the API key and drawn on a canvas.

import { ApiError, api, describeError, downloadAs, getArrayBuffer, getBlob, saveBlob } from "./api.js";
import { describeJob, shortId } from "./jobs.js";

// --- Pure helpers (exported for the browser tests) ------------------------------------------

/** Window presets in modality units (HU for CT). `null` means the DICOM default of the slice. */
export const PRESETS = Object.freeze([
  { id: "default", label: "DICOM default", center: null, width: null, key: "1" },
  { id: "lung", label: "Lung", center: -600, width: 1500, key: "2" },
  { id: "mediastinum", label: "Mediastinum", center: 40, width: 400, key: "3" },
  { id: "bone", label: "Bone", center: 400, width: 1800, key: "4" },
]);

const MAX_FINDING_SLICES = 12;

const FALLBACK_COLORS = [[255, 99, 71], [77, 171, 247], [255, 212, 59], [105, 219, 124], [218, 119, 242], [255, 169, 77]];

const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/**
 * Grey levels for every int16 value under a VOI linear window.
 *
 * Follows the linear VOI LUT function of DICOM PS3.3 C.11.2.1.2.1: values at or below
 * c − 0.5 − (w − 1)/2 map to 0, values above c − 0.5 + (w − 1)/2 map to 255, and values in
 * between to ((x − (c − 0.5)) / (w − 1) + 0.5) × 255, rounded. A width of 1 or less is a
 * threshold at c − 0.5.
 * Returns a Uint8Array of 65536 entries indexed by value + 32768.
 */
export function windowLut(center, width) {
  const lut = new Uint8Array(65536);
  const c = Number(center);
  const w = Number(width);
  for (let i = 0; i < 65536; i += 1) {
    const x = i - 32768;
    let y;
    if (w <= 1) y = x <= c - 0.5 ? 0 : 255;
    else if (x <= c - 0.5 - (w - 1) / 2) y = 0;
    else if (x > c - 0.5 + (w - 1) / 2) y = 255;
    else y = Math.round(((x - (c - 0.5)) / (w - 1) + 0.5) * 255);
    lut[i] = Math.min(255, Math.max(0, y));
  }
  return lut;
}

/** The same LUT as opaque RGBA pixels packed for a Uint32Array view of ImageData. */
function packedLut(lut) {
  const packed = new Uint32Array(lut.length);
  for (let i = 0; i < lut.length; i += 1) {
    const v = lut[i];
    packed[i] = LITTLE_ENDIAN ? (0xff000000 | (v << 16) | (v << 8) | v) >>> 0 : ((v << 24) | (v << 16) | (v << 8) | 0xff) >>> 0;
  }
  return packed;
}

/** Int16 little-endian bytes (the pixels endpoint) as an Int16Array, whatever the host order. */
export function int16FromBuffer(buffer) {
  if (buffer.byteLength % 2 !== 0) throw new Error(`odd pixel byte count ${buffer.byteLength}`);
  if (LITTLE_ENDIAN) return new Int16Array(buffer);
  const view = new DataView(buffer);
  const out = new Int16Array(buffer.byteLength / 2);
  for (let i = 0; i < out.length; i += 1) out[i] = view.getInt16(i * 2, true);
  return out;
}

/** [r, g, b] from the manifest's [r, g, b] or a "#rrggbb" string; null if neither. */
export function parseColor(color) {
  if (Array.isArray(color) && color.length >= 3) return color.slice(0, 3).map((v) => Math.max(0, Math.min(255, Number(v) | 0)));
  if (typeof color === "string") {
    const match = /^#?([0-9a-f]{6})$/i.exec(color.trim());
    if (match) {
      const n = parseInt(match[1], 16);
      return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
    }
  }
  return null;
}

/**
 * Colour a label image for display.
 *
 * `labels` holds one label value per pixel (row-major, rows × columns); `colors` maps a label
 * value to [r, g, b]; values not in `visible` and 0 (background) stay transparent.
 * Returns RGBA bytes (Uint8ClampedArray, 4 × rows × columns) with alpha 255 where coloured.
 */
export function colorizeLabels(labels, colors, visible) {
  const out = new Uint8ClampedArray(labels.length * 4);
  for (let i = 0; i < labels.length; i += 1) {
    const value = labels[i];
    if (value === 0 || !visible.has(value)) continue;
    const rgb = colors.get(value) || FALLBACK_COLORS[(value - 1) % FALLBACK_COLORS.length];
    const j = i * 4;
    out[j] = rgb[0];
    out[j + 1] = rgb[1];
    out[j + 2] = rgb[2];
    out[j + 3] = 255;
  }
  return out;
}

/**
 * The slices of a series in display order: every frame of every instance, in the order of
 * `series.instances` (already sorted along the slice normal by the server).
 */
export function buildSlices(series) {
  const slices = [];
  for (const instance of (series && series.instances) || []) {
    const frames = Math.max(1, Number(instance.frames) || 1);
    for (let frame = 0; frame < frames; frame += 1) {
      slices.push({
        sop: instance.sop_instance_uid,
        frame,
        frames,
        instanceNumber: instance.instance_number ?? null,
        rows: instance.rows,
        columns: instance.columns,
        window: instance.window || null,
      });
    }
  }
  return slices;
}

/** Largest rectangle of aspect columns:rows centred in a box (all in device pixels). */
export function fitRect(boxWidth, boxHeight, columns, rows) {
  const scale = Math.min(boxWidth / columns, boxHeight / rows);
  const width = columns * scale;
  const height = rows * scale;
  return { x: (boxWidth - width) / 2, y: (boxHeight - height) / 2, width, height, scale };
}

export function sliceKey(sop, frame) {
  return `${sop}|${frame ?? 0}`;
}

// --- Small caches --------------------------------------------------------------------------

class Lru {
  constructor(limit, dispose = () => {}) {
    this.limit = limit;
    this.dispose = dispose;
    this.map = new Map();
  }
  get(key) {
    if (!this.map.has(key)) return undefined;
    const value = this.map.get(key);
    this.map.delete(key);
    this.map.set(key, value);
    return value;
  }
  set(key, value) {
    this.map.delete(key);
    this.map.set(key, value);
    while (this.map.size > this.limit) {
      const [oldKey, oldValue] = this.map.entries().next().value;
      this.map.delete(oldKey);
      this.dispose(oldValue);
    }
  }
  clear() {
    for (const value of this.map.values()) this.dispose(value);
    this.map.clear();
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("aria-") || key.startsWith("data-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function percent(p) {
  return `${(Number(p) * 100).toFixed(1)} %`;
}

function formatNumber(value) {
  const n = Number(value);
  if (!Number.isFinite(n)) return "";
  return Math.abs(n) >= 100 || Number.isInteger(n) ? String(Math.round(n)) : n.toPrecision(3);
}

// --- The viewer ----------------------------------------------------------------------------

/**
 * Wire the viewer. `getModels()` returns the /api/v1/models items (for label names and
 * colours). Returns {open(jobId), close(), reset()}.
 */
export function initViewer({ announce, getModels }) {
  const $ = (id) => document.getElementById(id);
  const canvas = $("image-canvas");
  const ctx = canvas.getContext("2d");
  const slider = $("slice-slider");

  const pixelCache = new Lru(96);
  const labelCache = new Lru(64);
  const bitmapCache = new Lru(48, (bitmap) => bitmap && bitmap.close && bitmap.close());
  const base = document.createElement("canvas");
  const maskLayer = document.createElement("canvas");

  const V = {
    jobId: null,
    job: null,
    results: null,
    slices: [],
    index: 0,
    center: 40,
    width: 400,
    preset: "default",
    lut: null,
    lutKey: "",
    pixels: null,
    masks: new Map(),
    maskModels: [],
    maskModel: "",
    hiddenLabels: new Map(),
    maskReady: false,
    saliency: new Map(),
    saliencyChoices: [],
    saliencyChoice: "",
    saliencyBitmap: null,
    saliencyEntry: null,
    token: 0,
    pollTimer: null,
    loadController: null,
    colorbarUrl: null,
    colorbarFor: "",
    drag: null,
    wheel: 0,
    frame: 0,
  };

  // ----- window / level -----

  function presetById(id) {
    return PRESETS.find((p) => p.id === id);
  }

  function defaultWindow() {
    const slice = V.slices[V.index];
    if (V.pixels && V.pixels.window && Number(V.pixels.window.width) > 0) return V.pixels.window;
    if (slice && slice.window && Number(slice.window.width) > 0) return slice.window;
    if (V.pixels) {
      // No window in the header: span the slice's own value range.
      let lo = Infinity;
      let hi = -Infinity;
      for (const v of V.pixels.data) {
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
      if (Number.isFinite(lo)) return { center: (lo + hi) / 2, width: Math.max(1, hi - lo) };
    }
    return { center: 40, width: 400 };
  }

  function applyPreset(id, { speak = true } = {}) {
    const preset = presetById(id);
    if (!preset) return;
    V.preset = id;
    const win = preset.center === null ? defaultWindow() : preset;
    setWindow(Number(win.center), Number(win.width), { keepPreset: true });
    if (speak) announce(`${preset.label} window: centre ${formatNumber(V.center)}, width ${formatNumber(V.width)}.`);
  }

  function setWindow(center, width, { keepPreset = false } = {}) {
    V.center = Math.round(Math.max(-32768, Math.min(32767, center)));
    V.width = Math.round(Math.max(1, Math.min(65536, width)));
    if (!keepPreset) V.preset = "custom";
    $("wl-center").value = String(V.center);
    $("wl-width").value = String(V.width);
    for (const button of $("wl-presets").querySelectorAll("button")) {
      button.setAttribute("aria-pressed", String(button.dataset.preset === V.preset));
    }
    renderBase();
    requestDraw();
  }

  function renderBase() {
    if (!V.pixels) return;
    const key = `${V.center}|${V.width}`;
    if (V.lutKey !== key) {
      V.lut = packedLut(windowLut(V.center, V.width));
      V.lutKey = key;
    }
    const { data, rows, columns } = V.pixels;
    if (base.width !== columns || base.height !== rows) {
      base.width = columns;
      base.height = rows;
    }
    const bctx = base.getContext("2d");
    const image = bctx.createImageData(columns, rows);
    const out = new Uint32Array(image.data.buffer);
    const lut = V.lut;
    for (let i = 0; i < data.length; i += 1) out[i] = lut[data[i] + 32768];
    bctx.putImageData(image, 0, 0);
  }

  // ----- drawing -----

  function resizeCanvas() {
    const rect = canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(rect.width * dpr));
    const height = Math.max(1, Math.round(rect.height * dpr));
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
  }

  function requestDraw() {
    cancelAnimationFrame(V.frame);
    V.frame = requestAnimationFrame(draw);
  }

  function draw() {
    resizeCanvas();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.globalAlpha = 1;
    ctx.filter = "none";
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!V.pixels) return;
    const r = fitRect(canvas.width, canvas.height, V.pixels.columns, V.pixels.rows);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(base, r.x, r.y, r.width, r.height);
    if (V.maskModel && V.maskReady) {
      // Labels are categories: draw them crisp, without interpolated colours at the edges.
      ctx.imageSmoothingEnabled = false;
      ctx.globalAlpha = Number($("mask-opacity").value) / 100;
      ctx.drawImage(maskLayer, r.x, r.y, r.width, r.height);
    }
    if ($("saliency-toggle").checked && V.saliencyBitmap && V.saliencyEntry) {
      ctx.imageSmoothingEnabled = true;
      const opacity = Number($("saliency-opacity").value) / 100;
      if (V.saliencyEntry.suppressed) {
        ctx.filter = "grayscale(1)";
        ctx.globalAlpha = opacity * 0.5;
      } else {
        ctx.globalAlpha = opacity;
      }
      ctx.drawImage(V.saliencyBitmap, r.x, r.y, r.width, r.height);
      ctx.filter = "none";
    }
    ctx.globalAlpha = 1;
    canvas.dataset.drawn = String(V.index);
    updateCanvasLabel();
  }

  function updateCanvasLabel() {
    const slice = V.slices[V.index];
    if (!slice) return;
    const modality = (V.results && V.results.series && V.results.series.modality) || "Image";
    const parts = [`${modality} slice ${V.index + 1} of ${V.slices.length}`, `window centre ${V.center}, width ${V.width}`];
    parts.push(V.maskModel ? `${V.maskModel} mask shown` : "no mask");
    if ($("saliency-toggle").checked && V.saliencyEntry) {
      parts.push(`${V.saliencyEntry.method} heatmap shown${V.saliencyEntry.suppressed ? " (suppressed, negative prediction)" : ""}`);
    }
    canvas.setAttribute("aria-label", parts.join("; "));
  }

  // ----- loading -----

  async function loadPixels(slice) {
    const key = sliceKey(slice.sop, slice.frame);
    const hit = pixelCache.get(key);
    if (hit) return hit;
    const { buffer, headers } = await getArrayBuffer(api.pixelsPath(slice.sop, slice.frame));
    const rows = Number(headers.get("X-Rows")) || Number(slice.rows);
    const columns = Number(headers.get("X-Columns")) || Number(slice.columns);
    const data = int16FromBuffer(buffer);
    if (!rows || !columns || data.length !== rows * columns) {
      throw new Error(`pixel data has ${data.length} values, expected ${rows} × ${columns}`);
    }
    const wc = headers.get("X-Window-Center");
    const ww = headers.get("X-Window-Width");
    const window = wc !== null && ww !== null && Number(ww) > 0 ? { center: Number(wc), width: Number(ww) } : null;
    const entry = { data, rows, columns, window };
    pixelCache.set(key, entry);
    return entry;
  }

  async function loadLabels(mask) {
    const hit = labelCache.get(mask.id);
    if (hit) return hit;
    const blob = await getBlob(mask.url);
    // No colour management: the PNG's grey value is the label value and must arrive unchanged.
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const { width, height } = bitmap;
    const scratch = document.createElement("canvas");
    scratch.width = width;
    scratch.height = height;
    const sctx = scratch.getContext("2d", { willReadFrequently: true });
    sctx.drawImage(bitmap, 0, 0);
    const rgba = sctx.getImageData(0, 0, width, height).data;
    bitmap.close();
    const labels = new Uint8Array(width * height);
    for (let i = 0; i < labels.length; i += 1) labels[i] = rgba[i * 4];
    const entry = { labels, width, height };
    labelCache.set(mask.id, entry);
    return entry;
  }

  async function loadBitmap(url) {
    const hit = bitmapCache.get(url);
    if (hit) return hit;
    const bitmap = await createImageBitmap(await getBlob(url));
    bitmapCache.set(url, bitmap);
    return bitmap;
  }

  function modelLabels(modelName) {
    const model = (getModels() || []).find((m) => m.name === modelName);
    return (model && Array.isArray(model.labels) ? model.labels : []).filter((l) => Number(l.value) !== 0);
  }

  function labelColors(modelName) {
    const colors = new Map();
    for (const label of modelLabels(modelName)) {
      const rgb = parseColor(label.color);
      if (rgb) colors.set(Number(label.value), rgb);
    }
    return colors;
  }

  function currentMask() {
    const slice = V.slices[V.index];
    if (!slice || !V.maskModel) return null;
    return V.masks.get(`${V.maskModel}|${sliceKey(slice.sop, slice.frame)}`) || null;
  }

  function currentSaliency() {
    const slice = V.slices[V.index];
    if (!slice || !V.saliencyChoice) return null;
    return V.saliency.get(`${V.saliencyChoice}|${sliceKey(slice.sop, slice.frame)}`) || null;
  }

  async function updateMaskLayer(token) {
    V.maskReady = false;
    const mask = currentMask();
    renderLegend(mask);
    if (!mask) {
      $("mask-note").textContent = V.maskModel ? "No mask for this slice." : "";
      requestDraw();
      return;
    }
    $("mask-note").textContent = "";
    try {
      const { labels, width, height } = await loadLabels(mask);
      if (token !== V.token) return;
      const hidden = V.hiddenLabels.get(V.maskModel) || new Set();
      const visible = new Set();
      for (let v = 1; v < 256; v += 1) if (!hidden.has(v)) visible.add(v);
      const rgba = colorizeLabels(labels, labelColors(V.maskModel), visible);
      maskLayer.width = width;
      maskLayer.height = height;
      maskLayer.getContext("2d").putImageData(new ImageData(rgba, width, height), 0, 0);
      V.maskReady = true;
      requestDraw();
    } catch (err) {
      if (token === V.token) $("mask-note").textContent = `Mask could not be loaded: ${describeError(err)}`;
    }
  }

  async function updateSaliencyLayer(token) {
    const entry = currentSaliency();
    V.saliencyEntry = entry;
    V.saliencyBitmap = null;
    const on = $("saliency-toggle").checked;
    $("suppressed-badge").hidden = !(on && entry && entry.suppressed);
    $("colorbar").classList.toggle("is-suppressed", Boolean(entry && entry.suppressed));
    if (!V.saliencyChoice) {
      $("saliency-note").textContent = "No saliency maps in these results.";
    } else if (!entry) {
      $("saliency-note").textContent = "No heatmap for this slice.";
    } else {
      const target = entry.target ? ` for “${entry.target}”` : "";
      $("saliency-note").textContent = entry.suppressed
        ? `Suppressed${target}: the prediction on this slice is negative.`
        : `${entry.method} map${target} on a fixed scale.`;
    }
    updateColorbar(entry);
    requestDraw();
    if (!on || !entry) return;
    try {
      const bitmap = await loadBitmap(entry.overlay_url);
      if (token !== V.token || V.saliencyEntry !== entry) return;
      V.saliencyBitmap = bitmap;
      requestDraw();
    } catch (err) {
      if (token === V.token) $("saliency-note").textContent = `Heatmap could not be loaded: ${describeError(err)}`;
    }
  }

  async function updateColorbar(entry) {
    const any = entry || V.results?.saliency?.find((s) => `${s.model}|${s.method}` === V.saliencyChoice);
    const figure = $("colorbar");
    if (!any || !$("saliency-toggle").checked) {
      figure.hidden = true;
      return;
    }
    const range = Array.isArray(any.display_range) ? any.display_range : [];
    const scale = range.length === 2 ? `Fixed scale ${formatNumber(range[0])} to ${formatNumber(range[1])}` : "Fixed scale";
    $("colorbar-caption").textContent = `${scale} · ${any.method}${any.target ? ` · ${any.target}` : ""}`;
    figure.hidden = false;
    if (V.colorbarFor === V.saliencyChoice) return;
    V.colorbarFor = V.saliencyChoice;
    try {
      const blob = await getBlob(any.colorbar_url || `api/v1/saliency/${encodeURIComponent(any.id)}/colorbar.png`);
      if (V.colorbarUrl) URL.revokeObjectURL(V.colorbarUrl);
      V.colorbarUrl = URL.createObjectURL(blob);
      $("colorbar-img").src = V.colorbarUrl;
      $("colorbar-img").alt = `Colour scale of the ${any.method} heatmap from ${formatNumber(range[0])} to ${formatNumber(range[1])}`;
    } catch (err) {
      V.colorbarFor = "";
      $("saliency-note").textContent = `Colour bar could not be loaded: ${describeError(err)}`;
    }
  }

  // ----- panels -----

  function renderLegend(mask) {
    const legend = $("mask-legend");
    if (!V.maskModel) {
      legend.replaceChildren();
      return;
    }
    const hidden = V.hiddenLabels.get(V.maskModel) || new Set();
    const colors = labelColors(V.maskModel);
    const stats = new Map(((mask && mask.labels) || []).map((l) => [Number(l.value), l]));
    const labels = modelLabels(V.maskModel);
    const known = labels.length ? labels : [...stats.values()].filter((l) => Number(l.value) !== 0);
    legend.replaceChildren(
      ...known.map((label) => {
        const value = Number(label.value);
        const id = `legend-${V.maskModel}-${value}`.replace(/[^A-Za-z0-9_-]/g, "_");
        const rgb = colors.get(value) || FALLBACK_COLORS[(value - 1) % FALLBACK_COLORS.length];
        const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
        swatch.style.backgroundColor = `rgb(${rgb.join(",")})`;
        const box = el("input", { type: "checkbox", id, checked: !hidden.has(value) });
        box.addEventListener("change", () => {
          const set = V.hiddenLabels.get(V.maskModel) || new Set();
          if (box.checked) set.delete(value);
          else set.add(value);
          V.hiddenLabels.set(V.maskModel, set);
          updateMaskLayer(V.token);
        });
        const stat = stats.get(value);
        const area = stat && Number(stat.pixels) > 0
          ? `${stat.pixels} px${stat.area_mm2 !== null && stat.area_mm2 !== undefined ? ` · ${formatNumber(stat.area_mm2)} mm²` : ""}`
          : "none on this slice";
        return el("li", {}, box, el("label", { htmlFor: id }, swatch, el("span", { text: ` ${label.name}` })), el("span", { class: "muted small", text: ` ${area}` }));
      }),
    );
  }

  function findingItem(finding) {
    const meter = el("meter", { min: 0, max: 1, value: Number(finding.probability) || 0, "aria-label": `Probability of ${finding.label}` });
    const item = el(
      "li",
      { class: `finding ${finding.positive ? "is-positive" : "is-negative"}` },
      el("div", { class: "finding-head" }, el("span", { class: "finding-label", text: finding.label }), el("span", { class: "finding-prob", text: percent(finding.probability) })),
      meter,
      el("div", { class: "finding-meta" },
        el("span", { class: `chip ${finding.positive ? "chip-positive" : "chip-negative"}`, text: finding.positive ? "positive" : "negative" }),
        el("span", { class: "muted small", text: ` ${finding.model}${finding.model_version ? ` ${finding.model_version}` : ""}` }),
      ),
    );
    if (finding.uncertain) item.append(el("span", { class: "badge badge-review", text: "Uncertain — please review" }));
    const sal = finding.saliency_id && (V.results.saliency || []).find((s) => s.id === finding.saliency_id);
    if (sal) {
      const button = el("button", { type: "button", class: "button small", text: "Show heatmap" });
      button.addEventListener("click", () => {
        V.saliencyChoice = `${sal.model}|${sal.method}`;
        $("saliency-choice").value = V.saliencyChoice;
        $("saliency-toggle").checked = true;
        const target = V.slices.findIndex((s) => s.sop === sal.sop_instance_uid && s.frame === (sal.frame ?? 0));
        if (target >= 0 && target !== V.index) showSlice(target);
        else updateSaliencyLayer(V.token);
      });
      item.append(button);
    }
    return item;
  }

  function sliceIndexOf(ref) {
    return V.slices.findIndex((s) => s.sop === ref.sop_instance_uid && s.frame === (ref.frame ?? 0));
  }

  // A segmented lesion: size, extent and score, and a button to its largest cross-section.
  function lesionItem(finding) {
    const lesion = finding.lesion || {};
    const key = sliceIndexOf(finding);
    const first = lesion.first ? sliceIndexOf(lesion.first) : -1;
    const last = lesion.last ? sliceIndexOf(lesion.last) : -1;
    const size = [
      lesion.equivalent_diameter_mm != null ? `≈ ${lesion.equivalent_diameter_mm} mm` : null,
      lesion.volume_mm3 != null ? `${Math.round(lesion.volume_mm3)} mm³` : null,
      first >= 0 && last >= 0 ? (first === last ? `slice ${first + 1}` : `slices ${Math.min(first, last) + 1}–${Math.max(first, last) + 1}`) : null,
    ].filter(Boolean).join(" · ");
    const item = findingItem(finding);
    item.classList.add("lesion");
    item.querySelector(".finding-label").textContent = `${finding.label} ${lesion.number ?? ""}`.trim();
    item.insertBefore(el("div", { class: "small", text: size || "size unknown (no pixel or slice spacing)" }), item.querySelector("meter"));
    if (key >= 0) {
      const label = `Go to slice ${key + 1}, the largest cross-section of ${finding.label} ${lesion.number ?? ""}`;
      const button = el("button", { type: "button", class: "button small", text: `Go to slice ${key + 1}`, "aria-label": label });
      button.addEventListener("click", () => showSlice(key));
      item.append(button);
    }
    return item;
  }

  function renderFindings() {
    const slice = V.slices[V.index];
    const findings = (V.results && V.results.findings) || [];
    const here = findings.filter((f) => f.level === "slice" && slice && f.sop_instance_uid === slice.sop && (f.frame ?? 0) === slice.frame);
    const series = findings.filter((f) => f.level === "series");
    const lesions = findings
      .filter((f) => f.level === "lesion")
      .sort((a, b) => a.model.localeCompare(b.model) || (a.lesion?.number ?? 0) - (b.lesion?.number ?? 0));
    $("findings-slice").replaceChildren(...(here.length ? here.map(findingItem) : [el("li", { class: "muted", text: "No findings on this slice." })]));
    $("findings-series").replaceChildren(...(series.length ? series.map(findingItem) : [el("li", { class: "muted", text: "No series-level findings." })]));
    $("findings-lesions").replaceChildren(...(lesions.length ? lesions.map(lesionItem) : [el("li", { class: "muted", text: "No lesion segmented." })]));
  }

  function renderFindingSlices() {
    const findings = ((V.results && V.results.findings) || []).filter((f) => f.level === "slice" && (f.positive || f.uncertain));
    const best = new Map();
    for (const f of findings) {
      const index = V.slices.findIndex((s) => s.sop === f.sop_instance_uid && s.frame === (f.frame ?? 0));
      if (index < 0) continue;
      const prior = best.get(index);
      if (!prior || Number(f.probability) > Number(prior.probability)) best.set(index, f);
    }
    // The most probable slices, in series order, keep the panel short on long series.
    const top = [...best.entries()]
      .sort((a, b) => Number(b[1].probability) - Number(a[1].probability))
      .slice(0, MAX_FINDING_SLICES)
      .sort((a, b) => a[0] - b[0]);
    const buttons = top.map(([index, f]) => {
      const text = `${index + 1} · ${Math.round(Number(f.probability) * 100)} %${f.uncertain ? " ⚑" : ""}`;
      const label = `Go to slice ${index + 1}: ${f.label} ${percent(f.probability)}${f.uncertain ? ", uncertain" : ""}`;
      const button = el("button", { type: "button", class: "button small", text, "aria-label": label });
      button.title = label;
      button.addEventListener("click", () => showSlice(index));
      return button;
    });
    const note = best.size > top.length
      ? el("p", { class: "muted small", text: `The ${top.length} most probable of ${best.size} slices. ⚑ = uncertain.` })
      : el("p", { class: "muted small", text: best.size ? "Slice · probability. ⚑ = uncertain." : "No slice has a positive or uncertain finding." });
    $("finding-slices").replaceChildren(...buttons, note);
  }

  function downloadButton(text, action) {
    const button = el("button", { type: "button", class: "button small", text });
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await action();
        announce(`Downloaded ${text}.`);
      } catch (err) {
        $("viewer-status").textContent = `Download failed: ${describeError(err)}`;
      } finally {
        button.disabled = false;
      }
    });
    return el("li", {}, button);
  }

  function renderDownloads() {
    const results = V.results;
    if (!results) return;
    const slice = V.slices[V.index];
    const tag = slice ? `slice${V.index + 1}` : "slice";
    const job = shortId(V.jobId);
    const items = [
      downloadButton("Results (JSON)", async () => {
        saveBlob(new Blob([JSON.stringify(results, null, 2)], { type: "application/json" }), `medcad-${job}-results.json`);
      }),
    ];
    const mask = currentMask();
    if (mask) {
      items.push(downloadButton(`Mask PNG (${mask.model}, this slice)`, () => downloadAs(mask.url, `medcad-${job}-${mask.model}-${tag}-mask.png`)));
      if (mask.overlay_url) {
        items.push(downloadButton(`Mask overlay PNG (${mask.model}, this slice)`, () => downloadAs(mask.overlay_url, `medcad-${job}-${mask.model}-${tag}-overlay.png`)));
      }
    }
    const sal = currentSaliency();
    if (sal) {
      items.push(downloadButton(`Saliency map .npy (${sal.model} · ${sal.method}, this slice)`, () => downloadAs(sal.url, `medcad-${job}-${sal.model}-${sal.method}-${tag}.npy`)));
      items.push(downloadButton(`Heatmap overlay PNG (${sal.model} · ${sal.method}, this slice)`, () => downloadAs(sal.overlay_url, `medcad-${job}-${sal.model}-${sal.method}-${tag}-heatmap.png`)));
    }
    const dicom = results.dicom || {};
    for (const seg of dicom.seg || []) items.push(downloadButton(`DICOM SEG (${seg.model})`, () => downloadAs(seg.url, `medcad-${job}-${seg.model}-seg.dcm`)));
    for (const sr of dicom.sr || []) items.push(downloadButton(`DICOM SR (${sr.model})`, () => downloadAs(sr.url, `medcad-${job}-${sr.model}-sr.dcm`)));
    for (const pm of dicom.pmap || []) {
      items.push(downloadButton(`DICOM Parametric Map (${pm.model} · ${pm.method})`, () => downloadAs(pm.url, `medcad-${job}-${pm.model}-${pm.method}-pmap.dcm`)));
    }
    if (results.complete === false) {
      items.push(el("li", { class: "muted small", id: "dicom-pending", text: "DICOM SEG, SR and Parametric Maps: being built…" }));
    }
    $("downloads").replaceChildren(...items);
  }

  function updateSliceControls() {
    const slice = V.slices[V.index];
    slider.value = String(V.index);
    const where = slice && slice.instanceNumber !== null ? `, instance ${slice.instanceNumber}` : "";
    const frame = slice && slice.frames > 1 ? `, frame ${slice.frame + 1}` : "";
    $("slice-label").textContent = `${V.index + 1} / ${V.slices.length}`;
    slider.setAttribute("aria-valuetext", `Slice ${V.index + 1} of ${V.slices.length}${where}${frame}`);
  }

  async function showSlice(index) {
    if (!V.slices.length) return;
    V.index = Math.max(0, Math.min(V.slices.length - 1, index));
    const token = ++V.token;
    const slice = V.slices[V.index];
    updateSliceControls();
    renderFindings();
    renderDownloads();
    try {
      const pixels = await loadPixels(slice);
      if (token !== V.token) return;
      V.pixels = pixels;
      if (V.preset === "default") applyPreset("default", { speak: false });
      else renderBase();
      requestDraw();
    } catch (err) {
      if (token === V.token && !(err instanceof ApiError && err.status === 401)) {
        $("viewer-status").textContent = `Slice ${V.index + 1} could not be loaded: ${describeError(err)}`;
      }
      return;
    }
    updateMaskLayer(token);
    updateSaliencyLayer(token);
    prefetch(V.index);
  }

  function prefetch(index) {
    // Warm the neighbours so scrolling through the series does not wait on the network.
    for (const step of [1, -1, 2]) {
      const slice = V.slices[index + step];
      if (slice) loadPixels(slice).catch(() => {});
    }
  }

  // ----- setup per job -----

  function setupOverlays() {
    V.masks = new Map();
    for (const mask of V.results.masks || []) V.masks.set(`${mask.model}|${sliceKey(mask.sop_instance_uid, mask.frame)}`, mask);
    V.maskModels = [...new Set((V.results.masks || []).map((m) => m.model))];
    V.maskModel = V.maskModels[0] || "";
    const maskSelect = $("mask-model");
    maskSelect.replaceChildren(
      el("option", { value: "", text: "None (hide masks)" }),
      ...V.maskModels.map((name) => el("option", { value: name, text: name })),
    );
    maskSelect.value = V.maskModel;
    maskSelect.disabled = V.maskModels.length === 0;

    V.saliency = new Map();
    for (const entry of V.results.saliency || []) {
      V.saliency.set(`${entry.model}|${entry.method}|${sliceKey(entry.sop_instance_uid, entry.frame)}`, entry);
    }
    V.saliencyChoices = [...new Set((V.results.saliency || []).map((s) => `${s.model}|${s.method}`))];
    V.saliencyChoice = V.saliencyChoices[0] || "";
    V.colorbarFor = "";
    const salSelect = $("saliency-choice");
    salSelect.replaceChildren(
      ...(V.saliencyChoices.length
        ? V.saliencyChoices.map((choice) => el("option", { value: choice, text: choice.replace("|", " · ") }))
        : [el("option", { value: "", text: "No heatmaps in these results" })]),
    );
    salSelect.value = V.saliencyChoice;
    salSelect.disabled = V.saliencyChoices.length === 0;
    $("saliency-toggle").disabled = V.saliencyChoices.length === 0;
    $("saliency-toggle").checked = false;
  }

  function firstInterestingSlice() {
    // Open where the evidence is: the most probable positive slice finding, else the middle.
    const findings = (V.results.findings || []).filter((f) => f.level === "slice" && f.positive);
    findings.sort((a, b) => Number(b.probability) - Number(a.probability));
    for (const f of findings) {
      const index = V.slices.findIndex((s) => s.sop === f.sop_instance_uid && s.frame === (f.frame ?? 0));
      if (index >= 0) return index;
    }
    return Math.floor(V.slices.length / 2);
  }

  function describeSeries() {
    const series = V.results.series || {};
    return `${series.modality || "DICOM"} · ${V.slices.length} slices · series …${String(series.series_instance_uid || "").slice(-16)} · ${(V.job?.models || []).join(", ")}`;
  }

  /** The job has succeeded since its results were loaded: its DICOM objects are now listed. */
  async function refreshDicomObjects() {
    const results = await api.results(V.jobId, { signal: V.loadController.signal });
    if (!V.results) return;
    const ids = (r) => (r.masks || []).map((m) => m.id).join(",") + "|" + (r.saliency || []).map((m) => m.id).join(",");
    if (ids(results) !== ids(V.results)) {
      // The job ran again (its worker was lost) and replaced the rows shown: show the new set.
      await loadResults();
      return;
    }
    V.results.dicom = results.dicom;
    V.results.complete = results.complete;
    renderDownloads();
    announce("DICOM objects ready to download.");
  }

  async function loadResults() {
    const results = await api.results(V.jobId, { signal: V.loadController.signal });
    V.results = results;
    V.slices = buildSlices(results.series);
    $("viewer-meta").textContent = describeSeries();
    $("viewer-uncertain").hidden = !(results.uncertain || (V.job && V.job.uncertain));
    if (!V.slices.length) {
      $("viewer-status").textContent = "These results have no image slices.";
      return;
    }
    $("viewer-status").textContent = "";
    $("viewer-grid").hidden = false;
    slider.max = String(V.slices.length - 1);
    slider.disabled = V.slices.length < 2;
    setupOverlays();
    renderFindingSlices();
    V.preset = "default";
    announce(`Results for job ${shortId(V.jobId)} loaded: ${V.slices.length} slices.`);
    await showSlice(firstInterestingSlice());
  }

  async function poll() {
    clearTimeout(V.pollTimer);
    const jobId = V.jobId;
    try {
      const job = await api.job(jobId, { signal: V.loadController.signal });
      if (jobId !== V.jobId) return;
      V.job = job;
      $("viewer-title").textContent = `Job ${shortId(job.id)}`;
      if (V.results && !V.results.complete) {
        // Results shown while the DICOM objects were built: add them once the job has succeeded.
        if (job.status === "succeeded") await refreshDicomObjects();
        else if (job.status !== "failed") V.pollTimer = setTimeout(poll, 1000);
        else {
          // A job that fails after its results were shown serves none: take them down.
          V.results = null;
          $("viewer-grid").hidden = true;
          $("viewer-status").textContent = describeJob(job);
          announce(`Job ${shortId(job.id)} failed.`);
        }
        return;
      }
      if (job.status === "succeeded" || (job.status === "running" && job.results_at)) {
        await loadResults();
        if (!V.results.complete) V.pollTimer = setTimeout(poll, 1000);
        return;
      }
      $("viewer-meta").textContent = `${job.modality || "DICOM"} · ${job.instance_count ?? 0} images · ${(job.models || []).join(", ")}`;
      $("viewer-status").textContent = `${job.status === "failed" ? "" : "Not ready yet — "}${describeJob(job)}`;
      if (job.status !== "failed") V.pollTimer = setTimeout(poll, 2000);
      else announce(`Job ${shortId(job.id)} failed.`);
    } catch (err) {
      if (err && err.name === "AbortError") return;
      if (err instanceof ApiError && err.status === 401) return;
      if (err instanceof ApiError && err.status === 409) {
        // Results raced the status change: look again shortly.
        V.pollTimer = setTimeout(poll, 1000);
        return;
      }
      $("viewer-status").textContent = `Job ${shortId(jobId)} could not be loaded: ${describeError(err)}`;
    }
  }

  function open(jobId) {
    if (jobId === V.jobId && V.results) {
      requestDraw();
      return;
    }
    close();
    V.jobId = jobId;
    V.loadController = new AbortController();
    V.results = null;
    V.pixels = null;
    V.slices = [];
    $("viewer-grid").hidden = true;
    $("viewer-uncertain").hidden = true;
    $("viewer-title").textContent = `Job ${shortId(jobId)}`;
    $("viewer-meta").textContent = "";
    $("viewer-status").textContent = "Loading…";
    poll();
  }

  function close() {
    clearTimeout(V.pollTimer);
    V.loadController?.abort();
    V.token += 1;
  }

  function reset() {
    close();
    V.jobId = null;
    V.results = null;
    V.pixels = null;
    V.slices = [];
    pixelCache.clear();
    labelCache.clear();
    bitmapCache.clear();
    if (V.colorbarUrl) URL.revokeObjectURL(V.colorbarUrl);
    V.colorbarUrl = null;
    $("viewer-grid").hidden = true;
    $("viewer-status").textContent = "";
  }

  // ----- controls -----

  $("wl-presets").replaceChildren(
    ...PRESETS.map((preset) => {
      const text = preset.center === null ? preset.label : `${preset.label} ${preset.center}/${preset.width}`;
      const button = el("button", { type: "button", class: "button small", text, "aria-pressed": "false", "data-preset": preset.id });
      button.title = `Key ${preset.key}`;
      button.addEventListener("click", () => applyPreset(preset.id));
      return button;
    }),
  );
  $("wl-center").addEventListener("change", (e) => {
    const v = Number(e.target.value);
    if (Number.isFinite(v)) setWindow(v, V.width);
  });
  $("wl-width").addEventListener("change", (e) => {
    const v = Number(e.target.value);
    if (Number.isFinite(v) && v >= 1) setWindow(V.center, v);
  });
  slider.addEventListener("input", () => showSlice(Number(slider.value)));
  $("mask-model").addEventListener("change", (e) => {
    V.maskModel = e.target.value;
    updateMaskLayer(V.token);
    renderDownloads();
  });
  $("mask-opacity").addEventListener("input", () => {
    $("mask-opacity-value").textContent = `${$("mask-opacity").value} %`;
    requestDraw();
  });
  $("saliency-toggle").addEventListener("change", () => {
    updateSaliencyLayer(V.token);
    announce($("saliency-toggle").checked ? "Heatmap shown." : "Heatmap hidden.");
  });
  $("saliency-choice").addEventListener("change", (e) => {
    V.saliencyChoice = e.target.value;
    updateSaliencyLayer(V.token);
    renderDownloads();
  });
  $("saliency-opacity").addEventListener("input", () => {
    $("saliency-opacity-value").textContent = `${$("saliency-opacity").value} %`;
    requestDraw();
  });
  $("mask-opacity-value").textContent = `${$("mask-opacity").value} %`;
  $("saliency-opacity-value").textContent = `${$("saliency-opacity").value} %`;

  canvas.addEventListener("keydown", (event) => {
    if (!V.slices.length) return;
    const widthStep = Math.max(1, Math.round(V.width * 0.05));
    const centerStep = Math.max(1, Math.round(V.width * 0.02));
    const preset = PRESETS.find((p) => p.key === event.key);
    let handled = true;
    if (preset) applyPreset(preset.id);
    else if (event.key === "ArrowUp" && event.shiftKey) setWindow(V.center + centerStep, V.width);
    else if (event.key === "ArrowDown" && event.shiftKey) setWindow(V.center - centerStep, V.width);
    else if (event.key === "ArrowUp" || event.key === "PageUp") showSlice(V.index - (event.key === "PageUp" ? 10 : 1));
    else if (event.key === "ArrowDown" || event.key === "PageDown") showSlice(V.index + (event.key === "PageDown" ? 10 : 1));
    else if (event.key === "Home") showSlice(0);
    else if (event.key === "End") showSlice(V.slices.length - 1);
    else if (event.key === "ArrowRight") setWindow(V.center, V.width + widthStep);
    else if (event.key === "ArrowLeft") setWindow(V.center, V.width - widthStep);
    else handled = false;
    if (handled) event.preventDefault();
  });
  canvas.addEventListener(
    "wheel",
    (event) => {
      if (!V.slices.length) return;
      event.preventDefault();
      // Trackpads send many small deltas: step one slice per notch-sized amount.
      V.wheel += event.deltaY;
      if (Math.abs(V.wheel) >= 40) {
        showSlice(V.index + Math.sign(V.wheel));
        V.wheel = 0;
      }
    },
    { passive: false },
  );
  canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || !V.pixels) return;
    canvas.setPointerCapture(event.pointerId);
    V.drag = { x: event.clientX, y: event.clientY, center: V.center, width: V.width };
    canvas.focus();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (V.drag) {
      // Scale the sensitivity with the window so narrow and wide windows both feel usable.
      const gain = Math.max(1, V.drag.width / 256);
      setWindow(V.drag.center + (event.clientY - V.drag.y) * gain, V.drag.width + (event.clientX - V.drag.x) * gain);
    }
    showReadout(event);
  });
  const endDrag = (event) => {
    if (!V.drag) return;
    V.drag = null;
    if (canvas.hasPointerCapture(event.pointerId)) canvas.releasePointerCapture(event.pointerId);
    announce(`Window centre ${V.center}, width ${V.width}.`);
  };
  canvas.addEventListener("pointerup", endDrag);
  canvas.addEventListener("pointercancel", endDrag);
  canvas.addEventListener("pointerleave", () => {
    $("readout").textContent = `Window ${V.center} / ${V.width}`;
  });

  function showReadout(event) {
    if (!V.pixels) return;
    const rect = canvas.getBoundingClientRect();
    const dpr = canvas.width / rect.width;
    const r = fitRect(canvas.width, canvas.height, V.pixels.columns, V.pixels.rows);
    const col = Math.floor(((event.clientX - rect.left) * dpr - r.x) / r.scale);
    const row = Math.floor(((event.clientY - rect.top) * dpr - r.y) / r.scale);
    let text = `Window ${V.center} / ${V.width}`;
    if (col >= 0 && row >= 0 && col < V.pixels.columns && row < V.pixels.rows) {
      const unit = V.results?.series?.modality === "CT" ? " HU" : "";
      text += ` · (${col}, ${row}) = ${V.pixels.data[row * V.pixels.columns + col]}${unit}`;
    }
    $("readout").textContent = text;
  }

  new ResizeObserver(() => requestDraw()).observe(canvas);

  return { open, close, reset };
}
