// Entry point: sign-in, routing between the views (#/ and #/jobs/<id>) and the shared state.

import { ApiError, api, clearKey, describeError, getKey, setKey } from "./api.js";
import { initJobs } from "./jobs.js";
import { initUpload } from "./upload.js";
import { initViewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["signin", "work", "viewer"];

const session = { me: null, models: [], lastJobId: null, routed: false };

let announceTimer = 0;
/** Speak a short status through the polite live region (cleared first so repeats are read). */
function announce(text) {
  const region = $("announcer");
  region.textContent = "";
  clearTimeout(announceTimer);
  announceTimer = setTimeout(() => {
    region.textContent = text;
  }, 60);
}

const jobs = initJobs({ announce });
const upload = initUpload({ announce, onJobsCreated: () => jobs.refresh() });
const viewer = initViewer({ announce, getModels: () => session.models });

function showView(name) {
  for (const view of VIEWS) $(`view-${view}`).hidden = view !== name;
  for (const [id, view] of [["nav-work", "work"], ["nav-viewer", "viewer"]]) {
    if (view === name) $(id).setAttribute("aria-current", "page");
    else $(id).removeAttribute("aria-current");
  }
  document.body.dataset.view = name;
}

function jobIdFromHash() {
  const match = /^#\/jobs\/([^/?#]+)/.exec(window.location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

function route() {
  if (!session.me) {
    jobs.stop();
    viewer.close();
    showView("signin");
    return;
  }
  const jobId = jobIdFromHash();
  const first = !session.routed;
  session.routed = true;
  if (jobId) {
    session.lastJobId = jobId;
    $("nav-viewer").href = `#/jobs/${encodeURIComponent(jobId)}`;
    $("nav-viewer").hidden = false;
    jobs.stop();
    showView("viewer");
    viewer.open(jobId);
    if (!first) $("viewer-title").focus();
    return;
  }
  if (window.location.hash === "#/viewer" && session.lastJobId) {
    window.location.replace(`#/jobs/${encodeURIComponent(session.lastJobId)}`);
    return;
  }
  viewer.close();
  showView("work");
  jobs.start();
}

async function loadModels() {
  try {
    const answer = await api.models();
    session.models = Array.isArray(answer.items) ? answer.items : [];
    upload.setModels(session.models);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) upload.setModelsError(err);
  }
}

function signedIn(me) {
  session.me = me;
  $("account-who").textContent = `${me.name} · ${me.role}${me.key_prefix ? ` · key ${me.key_prefix}…` : ""}`;
  $("account").hidden = false;
  $("app-nav").hidden = false;
  $("nav-viewer").hidden = !session.lastJobId;
  $("api-key").value = "";
  $("signin-error").textContent = "";
  upload.setRole(me.role);
  loadModels();
  route();
}

function signOut(message = "") {
  clearKey();
  session.me = null;
  session.models = [];
  session.lastJobId = null;
  session.routed = false;
  upload.reset();
  jobs.reset();
  viewer.reset();
  $("account").hidden = true;
  $("app-nav").hidden = true;
  $("signin-error").textContent = message;
  showView("signin");
  announce(message || "Signed out.");
  $("api-key").focus();
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) {
    $("signin-error").textContent = "Enter an API key.";
    $("api-key").focus();
    return;
  }
  const button = $("signin-submit");
  button.disabled = true;
  $("signin-error").textContent = "";
  setKey(key);
  try {
    signedIn(await api.me());
    announce(`Signed in as ${session.me.name}.`);
  } catch (err) {
    clearKey();
    $("signin-error").textContent =
      err instanceof ApiError && (err.status === 401 || err.status === 403)
        ? "That key was not accepted. Check it and try again."
        : `Sign-in failed: ${describeError(err)}`;
    $("api-key").focus();
  } finally {
    button.disabled = false;
  }
});

$("sign-out").addEventListener("click", () => signOut());

window.addEventListener("medcad:unauthorized", () => {
  // Only a signed-in page reacts: a wrong key typed into the form is reported by the form.
  if (session.me) signOut("The server no longer accepts this key (revoked or expired). Sign in again.");
});

window.addEventListener("hashchange", route);

async function start() {
  showView("signin");
  if (!getKey()) return;
  try {
    signedIn(await api.me());
  } catch (err) {
    clearKey();
    $("signin-error").textContent =
      err instanceof ApiError && err.status === 401
        ? "The saved key is no longer accepted. Sign in again."
        : `Could not check the saved key: ${describeError(err)}`;
  }
}

start();
