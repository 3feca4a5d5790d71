// Jobs list: live status with polling, a status filter and paging.

import { ApiError, api, describeError } from "./api.js";

const FAST_POLL_MS = 2000; // while something on the page is queued or running
const SLOW_POLL_MS = 10000; // otherwise, to notice jobs submitted elsewhere
const MAX_BACKOFF_MS = 30000;

const STATUS_TEXT = { queued: "Queued", running: "Running", succeeded: "Succeeded", failed: "Failed" };

/** "42 s", "3 min", "1 h 5 min" for a number of seconds. */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(Number(seconds))) return "";
  const s = Math.max(0, Number(seconds));
  if (s < 1) return "under 1 s";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  const hours = Math.floor(s / 3600);
  return `${hours} h ${Math.round((s - hours * 3600) / 60)} min`;
}

/** Parse an ISO 8601 time; one without an offset is taken as UTC (the server's clock). */
export function parseTime(iso) {
  if (!iso) return Number.NaN;
  const text = String(iso);
  return Date.parse(/(Z|[+-]\d\d:?\d\d)$/i.test(text) ? text : `${text}Z`);
}

export function formatTime(iso) {
  if (!iso) return "";
  const date = new Date(parseTime(iso));
  if (Number.isNaN(date.getTime())) return "";
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function shortId(id) {
  return String(id || "").slice(0, 8);
}

/** The one-line state of a job a person needs: where it is in the queue, what it is doing, why it failed. */
export function describeJob(job) {
  switch (job.status) {
    case "queued": {
      const parts = ["Waiting in the queue"];
      if (job.queue_position !== null && job.queue_position !== undefined) parts[0] = `Position ${job.queue_position} in the queue`;
      if (job.eta_seconds !== null && job.eta_seconds !== undefined) parts.push(`starts in about ${formatDuration(job.eta_seconds)}`);
      return parts.join(" · ");
    }
    case "running": {
      if (job.results_at) return "Results ready · building the DICOM objects";
      const parts = [job.stage ? `Stage: ${job.stage}` : "Starting"];
      if (job.attempts > 1) parts.push(`attempt ${job.attempts}`);
      if (job.eta_seconds !== null && job.eta_seconds !== undefined) parts.push(`about ${formatDuration(job.eta_seconds)} left`);
      return parts.join(" · ");
    }
    case "succeeded": {
      const parts = ["Results ready"];
      if (job.started_at && job.finished_at) {
        parts.push(`took ${formatDuration((parseTime(job.finished_at) - parseTime(job.started_at)) / 1000)}`);
      }
      return parts.join(" · ");
    }
    case "failed": {
      const error = job.error || {};
      return `Failed: ${error.code || "error"}${error.detail ? ` — ${error.detail}` : ""}`;
    }
    default:
      return String(job.status || "unknown");
  }
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderJob(job) {
  const li = el("li", `job job-${job.status}`);
  li.dataset.jobId = job.id;
  li.dataset.status = job.status;
  const link = el("a", "job-link");
  link.href = `#/jobs/${encodeURIComponent(job.id)}`;

  const chip = el("span", `chip chip-${job.status}`, STATUS_TEXT[job.status] || job.status);
  const main = el("span", "job-main");
  const count = job.instance_count ?? 0;
  main.append(
    el("span", "job-title", `${job.modality || "DICOM"} · ${count} ${count === 1 ? "image" : "images"} · job ${shortId(job.id)}`),
    el("span", "job-sub muted", `Series …${String(job.series_instance_uid || "").slice(-16)} · ${(job.models || []).join(", ")}`),
  );
  const detail = el("span", "job-detail", describeJob(job));
  const when = el("span", "job-when muted small", formatTime(job.created_at));
  if (job.created_at) when.title = job.created_at;
  link.append(chip, main, detail, when);
  if (job.uncertain) link.append(el("span", "badge badge-review", "Uncertain — please review"));
  if (job.webhook) link.append(el("span", "job-webhook muted small", `Webhook to ${job.webhook.url_host}: ${job.webhook.status}`));
  li.append(link);
  return li;
}

/**
 * Wire the jobs panel. Returns {start, stop, refresh, reset}: the page starts polling when the
 * list is on screen and stops it when another view (or no key) is shown.
 */
export function initJobs({ announce }) {
  const $ = (id) => document.getElementById(id);
  const list = $("job-list");
  const statusFilter = $("job-status-filter");
  const pageSize = $("job-page-size");
  const state = { offset: 0, total: 0, timer: null, running: false, failures: 0, seen: new Map(), inflight: null };

  function limit() {
    return Number(pageSize.value) || 10;
  }

  function schedule(ms) {
    clearTimeout(state.timer);
    if (state.running) state.timer = setTimeout(refresh, ms);
  }

  function announceChanges(items) {
    const changes = [];
    for (const job of items) {
      const before = state.seen.get(job.id);
      if (before && before !== job.status) changes.push(`Job ${shortId(job.id)} ${STATUS_TEXT[job.status]?.toLowerCase() || job.status}.`);
      state.seen.set(job.id, job.status);
    }
    if (changes.length) announce(changes.join(" "));
  }

  async function refresh() {
    clearTimeout(state.timer);
    state.inflight?.abort();
    const controller = new AbortController();
    state.inflight = controller;
    try {
      const page = await api.jobs({
        status: statusFilter.value,
        limit: limit(),
        offset: state.offset,
        signal: controller.signal,
      });
      if (controller.signal.aborted) return;
      const items = Array.isArray(page.items) ? page.items : [];
      state.total = Number(page.total) || 0;
      if (!items.length && state.offset > 0 && state.total > 0) {
        // The page emptied (jobs finished or a filter changed): step back to the last page.
        state.offset = Math.max(0, Math.floor((state.total - 1) / limit()) * limit());
        schedule(0);
        return;
      }
      announceChanges(items);
      list.replaceChildren(...items.map(renderJob));
      if (!items.length) {
        const empty = el("li", "job-empty muted", statusFilter.value ? `No ${statusFilter.value} jobs.` : "No jobs yet: upload a series to start one.");
        list.append(empty);
      }
      const first = state.total ? state.offset + 1 : 0;
      const last = Math.min(state.offset + items.length, state.total);
      $("jobs-range").textContent = state.total ? `${first}–${last} of ${state.total}` : "";
      $("jobs-prev").disabled = state.offset === 0;
      $("jobs-next").disabled = state.offset + limit() >= state.total;
      $("jobs-error").textContent = "";
      $("jobs-updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
      state.failures = 0;
      const active = items.some((job) => job.status === "queued" || job.status === "running");
      schedule(active ? FAST_POLL_MS : SLOW_POLL_MS);
    } catch (err) {
      if (err && err.name === "AbortError") return;
      if (err instanceof ApiError && err.status === 401) return; // the page signs out
      state.failures += 1;
      $("jobs-error").textContent = `Jobs could not be loaded: ${describeError(err)}`;
      const wait = err instanceof ApiError && err.retryAfter ? err.retryAfter * 1000 : FAST_POLL_MS * 2 ** state.failures;
      schedule(Math.min(MAX_BACKOFF_MS, wait));
    } finally {
      if (state.inflight === controller) state.inflight = null;
    }
  }

  statusFilter.addEventListener("change", () => {
    state.offset = 0;
    refresh();
  });
  pageSize.addEventListener("change", () => {
    state.offset = 0;
    refresh();
  });
  $("jobs-refresh").addEventListener("click", () => refresh());
  $("jobs-prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - limit());
    refresh();
  });
  $("jobs-next").addEventListener("click", () => {
    if (state.offset + limit() < state.total) state.offset += limit();
    refresh();
  });
  document.addEventListener("visibilitychange", () => {
    if (!state.running) return;
    if (document.hidden) clearTimeout(state.timer);
    else refresh();
  });

  return {
    start() {
      state.running = true;
      refresh();
    },
    stop() {
      state.running = false;
      clearTimeout(state.timer);
      state.inflight?.abort();
    },
    refresh,
    reset() {
      this.stop();
      state.offset = 0;
      state.seen = new Map();
      list.replaceChildren();
      $("jobs-range").textContent = "";
      $("jobs-updated").textContent = "";
      $("jobs-error").textContent = "";
    },
  };
}
