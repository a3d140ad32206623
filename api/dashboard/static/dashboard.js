// genq dashboard: keeps the server-rendered pages live by polling small JSON endpoints under
// /admin/live/ (same-origin, with the session cookie). No framework, no build step.
"use strict";

const LIVE_STATES = new Set(["scheduled", "queued", "running", "canceling"]);
const JOB_POLL_MS = 1000;
const OVERVIEW_POLL_MS = 3000;

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  if (response.status === 401) { window.location.reload(); return null; }
  if (!response.ok) return null;
  return response.json();
}

function setState(el, state) {
  if (!el || el.textContent === state) return;
  el.textContent = state;
  el.className = "state state-" + state;
}

function updateBar(bar, job) {
  const fill = bar.querySelector(".bar");
  const pct = job.total > 0 ? Math.min(100, (100 * job.step) / job.total) : 0;
  fill.style.width = pct.toFixed(1) + "%";
  bar.querySelector(".label").textContent = job.total > 0 ? job.step + "/" + job.total : "";
  bar.setAttribute("aria-valuenow", job.step);
  bar.setAttribute("aria-valuemax", job.total);
  bar.dataset.stateNow = job.state;
}

async function pollJobs() {
  const bars = [...document.querySelectorAll("[data-progress]")]
    .filter((b) => LIVE_STATES.has(b.dataset.stateNow));
  const watcher = document.querySelector("[data-reload-when-done]");
  if (bars.length) {
    const ids = [...new Set(bars.map((b) => b.dataset.job))];
    const jobs = await getJSON("/admin/live/jobs?ids=" + encodeURIComponent(ids.join(",")));
    if (jobs) {
      for (const bar of bars) {
        const job = jobs[bar.dataset.job];
        if (!job) continue;
        updateBar(bar, job);
        const row = bar.closest("[data-job-row]");
        setState((row || document.querySelector("h1")).querySelector("[data-state]"), job.state);
        const message = document.querySelector("[data-message]");
        if (!row && message) message.textContent = job.message;
      }
      // On a job's page, a job that has just ended has outputs and a timeline to show.
      if (watcher && LIVE_STATES.has(watcher.dataset.stateNow)) {
        const job = jobs[watcher.dataset.reloadWhenDone];
        if (job && !LIVE_STATES.has(job.state)) { window.location.reload(); return; }
      }
    }
  }
  setTimeout(pollJobs, JOB_POLL_MS);
}

async function pollLogs() {
  const pane = document.querySelector("[data-logs]");
  const url = "/admin/live/jobs/" + encodeURIComponent(pane.dataset.logs) + "/logs?after=" + pane.dataset.after;
  const lines = await getJSON(url);
  if (lines && lines.length) {
    const atBottom = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 4;
    pane.append(lines.map((l) => l.time + " " + l.level + " " + l.message + "\n").join(""));
    pane.dataset.after = lines[lines.length - 1].id;
    if (atBottom) pane.scrollTop = pane.scrollHeight;
  }
  const watcher = document.querySelector("[data-reload-when-done]");
  if (watcher && LIVE_STATES.has(watcher.dataset.stateNow)) setTimeout(pollLogs, JOB_POLL_MS);
}

async function pollOverview() {
  const data = await getJSON("/admin/live/overview");
  if (data) {
    for (const [state, n] of Object.entries(data.counts)) {
      const el = document.querySelector('[data-count="' + state + '"]');
      if (el) el.textContent = n;
    }
    for (const el of document.querySelectorAll("[data-depth]")) {
      el.textContent = data.depths[el.dataset.depth] || 0;
    }
    const workers = document.querySelector("[data-workers]");
    if (workers) workers.textContent = data.workers;
  }
  setTimeout(pollOverview, OVERVIEW_POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
  if (document.querySelector("[data-progress]")) setTimeout(pollJobs, JOB_POLL_MS);
  if (document.querySelector("[data-live-overview]")) setTimeout(pollOverview, OVERVIEW_POLL_MS);
  const watcher = document.querySelector("[data-reload-when-done]");
  if (document.querySelector("[data-logs]") && watcher && LIVE_STATES.has(watcher.dataset.stateNow)) {
    setTimeout(pollLogs, JOB_POLL_MS);
  }
});
