// Talking to the medcad REST API from the page.
//
// The API key lives in sessionStorage (this tab only, gone when it closes) and travels only in
// the Authorization header, never in a URL, so it cannot leak through history, logs or referrers.
// Images and downloads are fetched with the header and handed to the page as blob: URLs.

const KEY_STORAGE = "medcad.apiKey";

/** Base path the app is served under ("" at the root), from the page shell. */
export const ROOT = (document.body && document.body.dataset.root) || "";

/** An error answered by the API: `{"error": code, "detail": text}` plus the HTTP status. */
export class ApiError extends Error {
  constructor(status, code, detail, retryAfter = null, body = null) {
    super(detail ? `${code}: ${detail}` : code);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.retryAfter = retryAfter;
    this.body = body;
  }
}

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return null;
  }
}

export function setKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

/** Resolve an API path ("api/v1/…", "/api/v1/…" or an absolute URL) against the app root. */
export function apiUrl(path) {
  if (/^https?:\/\//i.test(path)) return new URL(path);
  if (path.startsWith("/")) {
    // Paths from the API already carry any root path the server is mounted under.
    return new URL(path, window.location.origin);
  }
  return new URL(`${ROOT}/${path}`, window.location.origin);
}

/** Headers for a request to `url`: the key goes to our own origin only. */
function authHeaders(url, extra = {}) {
  const headers = { ...extra };
  const key = getKey();
  if (key && url.origin === window.location.origin) headers.Authorization = `Bearer ${key}`;
  return headers;
}

function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

/** Build an ApiError from a status and a (possibly non-JSON) body text. */
export function errorFromBody(status, text, retryAfter = null) {
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  const code = (body && typeof body.error === "string" && body.error) || `http_${status}`;
  let detail = body && body.detail;
  if (detail && typeof detail !== "string") detail = JSON.stringify(detail);
  if (!detail) detail = status === 0 ? "the server could not be reached" : `HTTP ${status}`;
  const error = new ApiError(status, code, detail, retryAfter, body);
  if (status === 401) window.dispatchEvent(new CustomEvent("medcad:unauthorized", { detail: error }));
  return error;
}

/** fetch() with the key; throws ApiError for non-2xx answers and for network failures. */
export async function apiFetch(path, { method = "GET", body, signal, headers = {} } = {}) {
  const url = apiUrl(path);
  let response;
  try {
    response = await fetch(url, {
      method,
      body,
      signal,
      headers: authHeaders(url, headers),
      credentials: "omit",
      cache: "no-store",
    });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "network_error", "the server could not be reached");
  }
  if (!response.ok) {
    const text = await response.text().catch(() => "");
    throw errorFromBody(response.status, text, parseRetryAfter(response.headers.get("Retry-After")));
  }
  return response;
}

export async function getJson(path, options = {}) {
  const response = await apiFetch(path, { ...options, headers: { Accept: "application/json" } });
  return response.json();
}

export async function getBlob(path, options = {}) {
  const response = await apiFetch(path, options);
  return response.blob();
}

export async function getArrayBuffer(path, options = {}) {
  const response = await apiFetch(path, options);
  return { buffer: await response.arrayBuffer(), headers: response.headers };
}

/** Fetch with the key and save the bytes under `filename` through a temporary blob: link. */
export async function downloadAs(path, filename) {
  const blob = await getBlob(path);
  saveBlob(blob, filename);
}

export function saveBlob(blob, filename) {
  const href = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = href;
  link.download = filename;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  // Give the browser time to start the download before the URL is revoked.
  setTimeout(() => URL.revokeObjectURL(href), 60_000);
}

// --- Typed helpers for the routes the page uses -------------------------------------------

export const api = {
  me: () => getJson("api/v1/me"),
  models: () => getJson("api/v1/models"),
  jobs: ({ status = "", limit = 25, offset = 0, signal } = {}) => {
    const query = new URLSearchParams({ limit: String(limit), offset: String(offset) });
    if (status) query.set("status", status);
    return getJson(`api/v1/jobs?${query}`, { signal });
  },
  job: (id, { signal } = {}) => getJson(`api/v1/jobs/${encodeURIComponent(id)}`, { signal }),
  results: (id, { signal } = {}) =>
    getJson(`api/v1/jobs/${encodeURIComponent(id)}/results`, { signal }),
  pixelsPath: (sop, frame) =>
    `api/v1/instances/${encodeURIComponent(sop)}/frames/${encodeURIComponent(frame)}/pixels`,
};

/**
 * POST files to /api/v1/studies with XMLHttpRequest so upload progress can be shown.
 *
 * `parts` is a list of {file, name}; `models` and `saliency` (extra explanation methods) are
 * sent as comma lists; `onProgress(loaded, total)` follows the request body.
 * Resolves to {status, body, retryAfter} for every HTTP answer (the caller reads the per-file
 * outcomes from 4xx bodies too) and rejects with ApiError(0) on network failure, or with an
 * AbortError when `signal` fires.
 */
export function uploadStudies(parts, { models = [], saliency = [], onProgress = () => {}, signal } = {}) {
  return new Promise((resolve, reject) => {
    const url = apiUrl("api/v1/studies");
    const form = new FormData();
    for (const part of parts) form.append("files", part.file, part.name);
    if (models.length) form.append("models", models.join(","));
    if (saliency.length) form.append("saliency", saliency.join(","));

    const xhr = new XMLHttpRequest();
    xhr.open("POST", url.href);
    for (const [name, value] of Object.entries(authHeaders(url, { Accept: "application/json" }))) {
      xhr.setRequestHeader(name, value);
    }
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = xhr.responseText ? JSON.parse(xhr.responseText) : null;
      } catch {
        body = null;
      }
      if (xhr.status === 401) errorFromBody(401, xhr.responseText);
      resolve({
        status: xhr.status,
        body,
        text: xhr.responseText,
        retryAfter: parseRetryAfter(xhr.getResponseHeader("Retry-After")),
      });
    });
    xhr.addEventListener("error", () =>
      reject(new ApiError(0, "network_error", "the upload could not reach the server")),
    );
    xhr.addEventListener("abort", () => reject(new DOMException("Upload cancelled", "AbortError")));
    if (signal) {
      if (signal.aborted) {
        reject(new DOMException("Upload cancelled", "AbortError"));
        return;
      }
      signal.addEventListener("abort", () => xhr.abort(), { once: true });
    }
    xhr.send(form);
  });
}

/** A short, human sentence for any error thrown by the helpers above. */
export function describeError(err) {
  if (!err) return "Unknown error.";
  if (err instanceof ApiError) {
    if (err.status === 0) return "The medcad server could not be reached. Check that it is running.";
    return `${err.code} — ${err.detail}`;
  }
  return String(err.message || err);
}
