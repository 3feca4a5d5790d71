// Upload panel: collect files (drop, file picker, folder picker), choose models, send them in
// batches with per-file progress, and show what the server did with every file.

import { ApiError, describeError, errorFromBody, uploadStudies } from "./api.js";

const DICOM_EXTENSIONS = new Set(["dcm", "dicom", "dic", "ima"]);
const MiB = 1024 * 1024;
export const BATCH_LIMITS = Object.freeze({ maxFiles: 200, maxBytes: 64 * MiB });
const MAX_BUSY_RETRIES = 3;

// --- Pure helpers (exported for the browser tests) ------------------------------------------

export function basename(path) {
  const parts = String(path).split(/[\\/]/);
  return parts[parts.length - 1];
}

export function dirname(path) {
  const parts = String(path).split(/[\\/]/);
  return parts.slice(0, -1).join("/");
}

export function isZipName(name) {
  return /\.zip$/i.test(basename(name));
}

/**
 * Decide whether a file found inside a folder should be sent.
 *
 * DICOM files often have no extension or a UID-like name ("1.2.840.…"), so those are kept;
 * hidden files, DICOMDIR media indexes and files with other extensions (images, notes, arrays
 * written next to a series) are left out and listed with the reason.
 * Returns {ok: boolean, reason: string}.
 */
export function classifyFile(path) {
  const base = basename(path);
  if (!base) return { ok: false, reason: "empty name" };
  if (base.startsWith(".")) return { ok: false, reason: "hidden file" };
  const lower = base.toLowerCase();
  if (lower === "dicomdir") return { ok: false, reason: "DICOMDIR index, not an image" };
  if (lower === "thumbs.db" || lower === "desktop.ini") return { ok: false, reason: "system file" };
  const dot = base.lastIndexOf(".");
  if (dot <= 0) return { ok: true, reason: "" };
  const ext = lower.slice(dot + 1);
  if (DICOM_EXTENSIONS.has(ext) || ext === "zip" || /^\d+$/.test(ext)) return { ok: true, reason: "" };
  return { ok: false, reason: `.${ext} is not DICOM or zip` };
}

/**
 * Split the chosen files into upload requests.
 *
 * Files of one folder (usually one series) stay together while they fit, so a series is
 * analysed from one request; each zip travels with its folder neighbours like any file.
 * A folder larger than the limits is cut into several requests.
 */
export function planBatches(items, { maxFiles = BATCH_LIMITS.maxFiles, maxBytes = BATCH_LIMITS.maxBytes } = {}) {
  const groups = new Map();
  for (const item of items) {
    const key = dirname(item.name);
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(item);
  }
  const batches = [];
  let current = [];
  let bytes = 0;
  const flush = () => {
    if (current.length) batches.push(current);
    current = [];
    bytes = 0;
  };
  for (const group of groups.values()) {
    const groupBytes = group.reduce((sum, item) => sum + item.size, 0);
    if (current.length && (current.length + group.length > maxFiles || bytes + groupBytes > maxBytes)) {
      flush();
    }
    for (const item of group) {
      if (current.length && (current.length >= maxFiles || bytes + item.size > maxBytes)) flush();
      current.push(item);
      bytes += item.size;
    }
  }
  flush();
  return batches;
}

/**
 * Spread the progress of one multipart request over its files.
 *
 * The browser reports bytes of the whole body; parts are sent in order, so the first files fill
 * up first. `total` includes the multipart framing, which is spread evenly.
 * Returns one fraction in [0, 1] per size.
 */
export function fileFractions(sizes, loaded, total) {
  const sum = sizes.reduce((a, b) => a + b, 0);
  if (!total || sum === 0) return sizes.map(() => (loaded >= total ? 1 : 0));
  const scaled = (loaded / total) * sum;
  let offset = 0;
  return sizes.map((size) => {
    const fraction = size === 0 ? (scaled >= offset ? 1 : 0) : (scaled - offset) / size;
    offset += size;
    return Math.min(1, Math.max(0, fraction));
  });
}

/**
 * Attach the server's per-file outcomes to the files that were sent.
 *
 * `sentNames` are the part names in request order; `reported` is the response `files` list.
 * A reported name matches a sent name exactly, then by base name (first unused one first, so
 * equal names in different folders keep their order); zip members go to their archive.
 * Returns {perFile: outcome[][], unmatched: outcome[]}.
 */
export function matchOutcomes(sentNames, reported) {
  const perFile = sentNames.map(() => []);
  const unmatched = [];
  const used = new Set();
  const exact = new Map();
  const byBase = new Map();
  const push = (map, key, index) => {
    if (!map.has(key)) map.set(key, []);
    map.get(key).push(index);
  };
  sentNames.forEach((name, index) => {
    push(exact, name, index);
    push(byBase, basename(name), index);
  });
  const zips = sentNames.map((name, index) => ({ name, index })).filter((z) => isZipName(z.name));

  // Zips can own many outcomes, plain files exactly one.
  const take = (map, key) => {
    for (const index of map.get(key) || []) {
      if (used.has(index)) continue;
      if (!isZipName(sentNames[index])) used.add(index);
      return index;
    }
    return -1;
  };
  const zipOwner = (name) => {
    const hit = zips.find(
      (z) =>
        name.startsWith(`${z.name}/`) ||
        name.startsWith(`${z.name}:`) ||
        name.startsWith(`${basename(z.name)}/`) ||
        name.startsWith(`${basename(z.name)}:`),
    );
    if (hit) return hit.index;
    return zips.length === 1 ? zips[0].index : -1;
  };

  for (const entry of reported) {
    const name = String(entry.filename ?? "");
    let index = take(exact, name);
    if (index < 0) index = take(byBase, basename(name));
    if (index < 0) index = zipOwner(name);
    if (index >= 0) perFile[index].push(entry);
    else unmatched.push(entry);
  }
  return { perFile, unmatched };
}

/** Count outcomes ({stored, duplicate, rejected}) over a list of per-file outcome lists. */
export function countOutcomes(lists) {
  const counts = { stored: 0, duplicate: 0, rejected: 0 };
  for (const list of lists) {
    for (const entry of list) {
      if (entry.outcome in counts) counts[entry.outcome] += 1;
    }
  }
  return counts;
}

// --- Collecting files ----------------------------------------------------------------------

function readEntries(reader) {
  return new Promise((resolve, reject) => reader.readEntries(resolve, reject));
}

function entryFile(entry) {
  return new Promise((resolve, reject) => entry.file(resolve, reject));
}

async function walkEntry(entry, out, explicit) {
  if (entry.isFile) {
    const file = await entryFile(entry);
    const name = (entry.fullPath || "").replace(/^\/+/, "") || file.name;
    out.push({ file, name, explicit });
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    // readEntries answers in chunks (about 100 at a time) until it returns an empty list.
    for (;;) {
      const chunk = await readEntries(reader);
      if (!chunk.length) break;
      for (const child of chunk) await walkEntry(child, out, false);
    }
  }
}

/**
 * Turn a drop's DataTransfer into [{file, name, explicit}], walking dropped folders.
 *
 * Entries must be taken synchronously, before the first await: the browser empties the
 * DataTransfer when the drop handler returns. Dropped files are `explicit` (always sent);
 * files found inside folders are filtered by classifyFile.
 */
export function collectFromDataTransfer(dataTransfer) {
  const entries = [];
  const loose = [];
  const items = dataTransfer.items ? Array.from(dataTransfer.items) : [];
  for (const item of items) {
    if (item.kind !== "file") continue;
    const entry = typeof item.webkitGetAsEntry === "function" ? item.webkitGetAsEntry() : null;
    if (entry) entries.push(entry);
    else {
      const file = item.getAsFile();
      if (file) loose.push(file);
    }
  }
  if (!items.length && dataTransfer.files) loose.push(...dataTransfer.files);
  return (async () => {
    const out = loose.map((file) => ({ file, name: file.name, explicit: true }));
    for (const entry of entries) await walkEntry(entry, out, true);
    return out;
  })();
}

/** Files from an <input type=file>; folder pickers give webkitRelativePath. */
export function collectFromInput(input, { folder = false } = {}) {
  return Array.from(input.files || []).map((file) => ({
    file,
    name: file.webkitRelativePath || file.name,
    explicit: !folder,
  }));
}

// --- The panel -----------------------------------------------------------------------------

function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < MiB) return `${(bytes / 1024).toFixed(1)} KB`;
  if (bytes < 1024 * MiB) return `${(bytes / MiB).toFixed(1)} MB`;
  return `${(bytes / (1024 * MiB)).toFixed(2)} GB`;
}

function plural(n, word, many = `${word}s`) {
  return `${n} ${n === 1 ? word : many}`;
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        reject(new DOMException("Upload cancelled", "AbortError"));
      },
      { once: true },
    );
  });
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

/**
 * Wire the upload panel.
 *
 * `announce(text)` speaks status through the page's live region; `onJobsCreated(jobs)` lets the
 * jobs list refresh at once. Returns {setModels, setRole, reset}.
 */
export function initUpload({ announce, onJobsCreated }) {
  const $ = (id) => document.getElementById(id);
  const dropzone = $("dropzone");
  const fileInput = $("file-input");
  const folderInput = $("folder-input");
  const startButton = $("upload-start");
  const cancelButton = $("upload-cancel");
  const clearButton = $("upload-clear");
  const errorBox = $("upload-error");
  const rowsBody = $("upload-file-rows");

  const state = { items: [], skipped: [], keys: new Set(), uploading: false, controller: null, hasModels: false };

  function refreshSelection() {
    const bytes = state.items.reduce((sum, item) => sum + item.size, 0);
    const zips = state.items.filter((item) => isZipName(item.name)).length;
    $("selection-summary").textContent = state.items.length
      ? `${plural(state.items.length, "file")} chosen (${formatBytes(bytes)})` +
        (zips ? `, including ${plural(zips, "zip archive")}.` : ".")
      : "No files chosen yet.";
    const skipped = $("skipped");
    skipped.hidden = state.skipped.length === 0;
    $("skipped-summary").textContent = `${plural(state.skipped.length, "file")} left out`;
    $("skipped-list").replaceChildren(
      ...state.skipped.slice(0, 200).map((s) => el("li", { text: `${s.name} — ${s.reason}` })),
    );
    startButton.disabled = state.uploading || !state.items.length || !state.hasModels;
    clearButton.disabled = state.uploading || (!state.items.length && !state.skipped.length);
    startButton.textContent = state.items.length ? `Upload ${plural(state.items.length, "file")}` : "Upload";
  }

  function addItems(found) {
    let added = 0;
    for (const { file, name, explicit } of found) {
      const verdict = explicit ? { ok: true, reason: "" } : classifyFile(name);
      if (!verdict.ok) {
        state.skipped.push({ name, reason: verdict.reason });
        continue;
      }
      const key = `${name}\u0000${file.size}\u0000${file.lastModified}`;
      if (state.keys.has(key)) continue;
      state.keys.add(key);
      state.items.push({ file, name, size: file.size });
      added += 1;
    }
    // Folder listings come in no useful order; show and send files in natural name order.
    state.items.sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
    errorBox.textContent = "";
    refreshSelection();
    announce(`${plural(added, "file")} added. ${plural(state.items.length, "file")} ready to upload.`);
  }

  function clearSelection() {
    state.items = [];
    state.skipped = [];
    state.keys = new Set();
    fileInput.value = "";
    folderInput.value = "";
    refreshSelection();
  }

  // Drag and drop. The window-level handlers stop a missed drop from navigating away.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => {
      if (event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files")) {
        event.preventDefault();
      }
    });
  }
  dropzone.addEventListener("dragenter", (event) => {
    event.preventDefault();
    dropzone.classList.add("is-over");
  });
  dropzone.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
    dropzone.classList.add("is-over");
  });
  dropzone.addEventListener("dragleave", (event) => {
    if (!dropzone.contains(event.relatedTarget)) dropzone.classList.remove("is-over");
  });
  dropzone.addEventListener("drop", async (event) => {
    event.preventDefault();
    dropzone.classList.remove("is-over");
    if (state.uploading || !event.dataTransfer) return;
    try {
      addItems(await collectFromDataTransfer(event.dataTransfer));
    } catch (err) {
      errorBox.textContent = `Could not read the dropped items: ${describeError(err)}`;
    }
  });

  $("pick-files").addEventListener("click", () => fileInput.click());
  $("pick-folder").addEventListener("click", () => folderInput.click());
  fileInput.addEventListener("change", () => {
    addItems(collectFromInput(fileInput));
    fileInput.value = "";
  });
  folderInput.addEventListener("change", () => {
    addItems(collectFromInput(folderInput, { folder: true }));
    folderInput.value = "";
  });
  clearButton.addEventListener("click", clearSelection);
  cancelButton.addEventListener("click", () => state.controller?.abort());
  startButton.addEventListener("click", () => runUpload());

  function selectedModels() {
    return Array.from(document.querySelectorAll("#model-list input[type=checkbox]:checked")).map(
      (box) => box.value,
    );
  }

  function selectedSaliency() {
    return Array.from(document.querySelectorAll("#explain-choice input[type=checkbox]:checked")).map(
      (box) => box.value,
    );
  }

  function makeRow(item) {
    const progress = el("progress", { max: 1, value: 0, "aria-label": `Upload progress of ${item.name}` });
    const outcome = el("td", { class: "outcome" }, el("span", { class: "chip chip-waiting", text: "waiting" }));
    const tr = el(
      "tr",
      {},
      el("td", { class: "file-name" }, el("span", { text: item.name }), item.size === null ? null : el("span", { class: "muted small", text: ` ${formatBytes(item.size)}` })),
      el("td", { class: "file-progress" }, progress),
      outcome,
    );
    return { item, tr, progress, outcome };
  }

  function chip(kind, text) {
    return el("span", { class: `chip chip-${kind}`, text });
  }

  function showOutcome(row, entries, fallbackError) {
    row.progress.value = 1;
    if (fallbackError) {
      row.outcome.replaceChildren(chip("rejected", "rejected"), el("span", { class: "outcome-detail", text: ` ${fallbackError}` }));
      row.tr.dataset.outcome = "rejected";
      return;
    }
    if (!entries.length) {
      row.outcome.replaceChildren(chip("warning", "no answer"), el("span", { class: "outcome-detail", text: " the server did not report this file" }));
      row.tr.dataset.outcome = "unknown";
      return;
    }
    if (entries.length === 1 && !isZipName(row.item.name)) {
      const entry = entries[0];
      const nodes = [chip(entry.outcome, entry.outcome)];
      if (entry.outcome === "rejected") {
        nodes.push(el("span", { class: "outcome-detail", text: ` ${entry.error || "rejected"} — ${entry.detail || ""}` }));
      }
      row.outcome.replaceChildren(...nodes);
      row.tr.dataset.outcome = entry.outcome;
      return;
    }
    // An archive: summarise its members and list them on demand.
    const counts = countOutcomes([entries]);
    const summary = ["stored", "duplicate", "rejected"]
      .filter((k) => counts[k])
      .map((k) => `${counts[k]} ${k}`)
      .join(", ");
    const list = el(
      "ul",
      { class: "member-list" },
      ...entries.map((entry) =>
        el("li", { text: `${entry.filename}: ${entry.outcome}${entry.error ? ` (${entry.error} — ${entry.detail || ""})` : ""}` }),
      ),
    );
    row.outcome.replaceChildren(
      el("details", {}, el("summary", {}, chip(counts.rejected ? "rejected" : "stored", summary || "empty")), list),
    );
    row.tr.dataset.outcome = counts.rejected && !counts.stored ? "rejected" : "stored";
  }

  async function sendBatch(rows, choice, signal, report) {
    for (let attempt = 0; ; attempt += 1) {
      rows.forEach((row) => row.outcome.replaceChildren(chip("uploading", "uploading")));
      const sizes = rows.map((row) => row.item.size);
      let frame = 0;
      const response = await uploadStudies(
        rows.map((row) => ({ file: row.item.file, name: row.item.name })),
        {
          models: choice.models,
          saliency: choice.saliency,
          signal,
          onProgress: (loaded, total) => {
            cancelAnimationFrame(frame);
            frame = requestAnimationFrame(() => {
              fileFractions(sizes, loaded, total).forEach((f, i) => {
                rows[i].progress.value = f;
              });
              if (loaded >= total) rows.forEach((row) => row.outcome.replaceChildren(chip("uploading", "checking")));
            });
          },
        },
      );
      cancelAnimationFrame(frame);

      if (response.status === 413 && rows.length > 1) {
        // Over the server's request size cap: halve the batch and try again.
        const half = Math.ceil(rows.length / 2);
        await sendBatch(rows.slice(0, half), choice, signal, report);
        await sendBatch(rows.slice(half), choice, signal, report);
        return;
      }
      if ((response.status === 429 || response.status === 503) && attempt < MAX_BUSY_RETRIES) {
        const wait = Math.min(60, response.retryAfter ?? 5 * (attempt + 1));
        $("upload-summary").textContent = `The server is busy; trying again in ${Math.ceil(wait)} s…`;
        await sleep(wait * 1000, signal);
        continue;
      }

      const body = response.body || {};
      let reported = Array.isArray(body.files) ? body.files : null;
      if (!reported && Array.isArray(body.rejected) && body.rejected.length) {
        reported = body.rejected.map((r) => ({ ...r, outcome: "rejected" }));
      }
      if (reported) {
        const { perFile, unmatched } = matchOutcomes(rows.map((row) => row.item.name), reported);
        rows.forEach((row, i) => showOutcome(row, perFile[i], null));
        report.outcomes.push(...perFile, unmatched);
        for (const entry of unmatched) {
          // Reported under a name we did not send (e.g. renamed by the server): still show it.
          const extra = makeRow({ name: String(entry.filename || "(unnamed)"), size: null });
          rowsBody.append(extra.tr);
          showOutcome(extra, [entry], null);
        }
      } else if (response.status >= 400) {
        const error = errorFromBody(response.status, response.text, response.retryAfter);
        rows.forEach((row) => showOutcome(row, [], `${error.code} — ${error.detail}`));
        report.outcomes.push(rows.map(() => ({ outcome: "rejected" })));
        report.errors.push(error);
      } else {
        rows.forEach((row) => showOutcome(row, [], null));
      }
      if (Array.isArray(body.jobs)) report.jobs.push(...body.jobs);
      return;
    }
  }

  function renderCreatedJobs(jobs) {
    $("created-jobs").replaceChildren(
      ...jobs.map((job) =>
        el(
          "li",
          {},
          el("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, text: `Open job ${String(job.id).slice(0, 8)}` }),
          el("span", { class: "muted small", text: ` series …${String(job.series_instance_uid || "").slice(-12)} · ${job.status}` }),
        ),
      ),
    );
  }

  async function runUpload() {
    const models = selectedModels();
    if (!models.length) {
      errorBox.textContent = "Choose at least one model to run.";
      return;
    }
    const choice = { models, saliency: selectedSaliency() };
    if (!state.items.length) return;
    errorBox.textContent = "";
    state.uploading = true;
    state.controller = new AbortController();
    cancelButton.hidden = false;
    refreshSelection();

    const rows = state.items.map(makeRow);
    rowsBody.replaceChildren(...rows.map((row) => row.tr));
    $("upload-results").hidden = false;
    $("created-jobs").replaceChildren();
    const batches = planBatches(rows.map((row) => row.item));
    const rowOf = new Map(rows.map((row) => [row.item, row]));
    const report = { outcomes: [], jobs: [], errors: [] };
    $("upload-summary").textContent = `Uploading ${plural(rows.length, "file")} in ${plural(batches.length, "request")}…`;
    announce($("upload-summary").textContent);

    let stopped = null;
    try {
      for (const [n, batch] of batches.entries()) {
        $("upload-summary").textContent = `Uploading request ${n + 1} of ${batches.length}…`;
        await sendBatch(batch.map((item) => rowOf.get(item)), choice, state.controller.signal, report);
        if (report.jobs.length) renderCreatedJobs(report.jobs);
      }
    } catch (err) {
      stopped = err;
    } finally {
      state.uploading = false;
      state.controller = null;
      cancelButton.hidden = true;
    }

    const counts = countOutcomes(report.outcomes);
    let summary =
      `${counts.stored} stored, ${counts.duplicate} ${counts.duplicate === 1 ? "duplicate" : "duplicates"}, ` +
      `${counts.rejected} rejected; ${plural(report.jobs.length, "job")} queued.`;
    if (stopped) {
      const reason = stopped.name === "AbortError" ? "Upload cancelled" : `Upload stopped: ${describeError(stopped)}`;
      summary = `${reason}. ${summary}`;
      rows.filter((row) => !row.tr.dataset.outcome).forEach((row) => {
        row.outcome.replaceChildren(chip("warning", "not sent"));
      });
      if (!(stopped instanceof ApiError) && stopped.name !== "AbortError") errorBox.textContent = describeError(stopped);
    } else {
      summary = `Upload finished: ${summary}`;
      state.items = [];
      state.keys = new Set();
      state.skipped = [];
    }
    if (report.errors.length) errorBox.textContent = describeError(report.errors[0]);
    $("upload-summary").textContent = summary;
    announce(summary);
    renderCreatedJobs(report.jobs);
    refreshSelection();
    if (report.jobs.length) onJobsCreated(report.jobs);
  }

  function setModels(models) {
    const list = $("model-list");
    const items = (models || []).filter((m) => m && m.name);
    state.hasModels = items.length > 0;
    if (!items.length) {
      list.replaceChildren(el("p", { class: "muted", text: "No models are installed on this server." }));
      refreshSelection();
      return;
    }
    list.replaceChildren(
      ...items.map((model) => {
        const id = `model-${model.name}-${model.version}`.replace(/[^A-Za-z0-9_-]/g, "_");
        // name:version, so an earlier release or an INT8 build runs as chosen (a bare name
        // would resolve to the newest release)
        const value = model.version ? `${model.name}:${model.version}` : model.name;
        const box = el("input", { type: "checkbox", id, value, checked: Boolean(model.default) });
        if (model.description) box.setAttribute("aria-describedby", `${id}-desc`);
        return el(
          "div",
          { class: "model-option" },
          box,
          el("label", { htmlFor: id }, el("span", { class: "model-name", text: `${model.name} ${model.version || ""}` }), el("span", { class: "tag", text: model.task || "" })),
          model.description ? el("p", { class: "muted small model-desc", id: `${id}-desc`, text: model.description }) : null,
        );
      }),
    );
    refreshSelection();
  }

  function setModelsError(err) {
    state.hasModels = false;
    $("model-list").replaceChildren(el("p", { class: "form-error", text: `Models could not be loaded: ${describeError(err)}` }));
    refreshSelection();
  }

  function setRole(role) {
    const canUpload = role === "uploader" || role === "admin";
    $("upload-role-note").hidden = canUpload;
    $("upload-body").hidden = !canUpload;
  }

  function reset() {
    state.controller?.abort();
    clearSelection();
    rowsBody.replaceChildren();
    $("upload-results").hidden = true;
    errorBox.textContent = "";
  }

  refreshSelection();
  return { setModels, setModelsError, setRole, reset };
}
