// genq dashboard: keeps the server-rendered pages live by polling small JSON endpoints under
// /admin/live/ (same-origin, with the session cookie). No framework, no build step.
"use strict";

const LIVE_STATES = new Set(["scheduled", "queued", "running", "canceling"]);
const JOB_POLL_MS = 1000;
const OVERVIEW_POLL_MS = 3000;

async function getJSON(url) {
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" } });
  } catch {
    return null; // the server is away for a moment: the next poll tries again
  }
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
  const bars = [...document.querySelectorAll("[data-job-row] [data-progress]")]
    .filter((b) => LIVE_STATES.has(b.dataset.stateNow));
  if (bars.length) {
    const ids = [...new Set(bars.map((b) => b.dataset.job))];
    const jobs = await getJSON("/admin/live/jobs?ids=" + encodeURIComponent(ids.join(",")));
    if (jobs) {
      for (const bar of bars) {
        const job = jobs[bar.dataset.job];
        if (!job) continue;
        updateBar(bar, job);
        setState(bar.closest("[data-job-row]").querySelector("[data-state]"), job.state);
      }
    }
  }
  setTimeout(pollJobs, JOB_POLL_MS);
}

// An element with text children: strings become text nodes (append never parses HTML), and
// attribute values stay values, so job data cannot turn into markup here.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function stateBadge(state) {
  return el("span", { class: "state state-" + state, "data-state": "" }, state);
}

// The same markup as the timeline entries job.html renders.
function timelineEntry(e) {
  const li = el("li", { "data-event": e.id }, (e.from || "\u2013") + " \u2192 ", stateBadge(e.to), " ",
    el("time", { datetime: e.at }, e.when));
  if (e.attempt) li.append(" ", el("span", { class: "muted" }, "attempt " + e.attempt));
  if (e.reason) li.append(" ", el("span", { class: "muted" }, e.reason));
  return li;
}

// The same markup as job.html's gallery: an image thumbnail, a text preview or a link.
function outputEntry(a) {
  const marks = { "data-output": a.name, "data-artifact": a.id };
  if (a.content_type.startsWith("image/")) {
    return el("a", { class: a.kind === "grid" ? "thumb grid" : "thumb", href: a.url, target: "_blank", rel: "noopener", ...marks },
      el("img", { src: a.url, alt: a.name, loading: "lazy" }), el("span", {}, a.name));
  }
  if (typeof a.preview === "string") {
    return el("figure", { class: "text-output", ...marks },
      el("figcaption", {}, el("a", { href: a.url }, a.name)), el("pre", {}, a.preview));
  }
  return el("a", { href: a.url, ...marks }, a.name + " (" + a.size_bytes + " bytes)");
}

// The loss chart's SVG from the poll, drawn by our chart code. Parsed as an SVG document and
// imported, never set as HTML; a script element or an on* attribute means it is not ours, and
// the page keeps the chart it has.
function svgNode(text) {
  const doc = new DOMParser().parseFromString(text, "image/svg+xml");
  const root = doc.documentElement;
  if (root.localName !== "svg" || doc.querySelector("parsererror")) return null;
  for (const node of [root, ...root.querySelectorAll("*")]) {
    if (["script", "foreignObject", "a"].includes(node.localName)) return null;
    if ([...node.attributes].some((a) => a.name.toLowerCase().startsWith("on"))) return null;
  }
  return document.importNode(root, true);
}

// The same rows as job.html's "Latest metrics": a metric's newest value and its step.
function metricRow(m) {
  return el("tr", { "data-metric": m.name }, el("th", {}, m.name),
    el("td", {}, String(Number(m.value.toPrecision(6))) + " ", el("span", { class: "muted" }, "step " + m.step)));
}

function applyMetrics(job) {
  if (typeof job.loss_chart === "string" && job.loss_chart) {
    const chart = svgNode(job.loss_chart);
    if (chart) {
      document.querySelector("[data-loss-chart]").replaceChildren(chart);
      document.querySelector("[data-loss-box]").hidden = false;
    }
  }
  if (Array.isArray(job.metrics) && job.metrics.length) {
    document.querySelector("[data-latest-metrics]").replaceChildren(...job.metrics.map(metricRow));
    document.querySelector("[data-latest-box]").hidden = false;
  }
}

function applyJob(job) {
  const bar = document.querySelector("h1 ~ section [data-progress]");
  if (bar) updateBar(bar, job);
  setState(document.querySelector("h1 [data-state]"), job.state);
  const fields = { "[data-message]": job.message, "[data-attempt]": job.attempt, "[data-max-attempts]": job.max_attempts };
  for (const [selector, value] of Object.entries(fields)) {
    const node = document.querySelector(selector);
    if (node && node.textContent !== String(value)) node.textContent = value;
  }
  for (const form of document.querySelectorAll("form[data-show-in]")) {
    form.hidden = !form.dataset.showIn.split(" ").includes(job.state);
  }
  const timeline = document.querySelector("[data-timeline]");
  for (const e of job.timeline) {
    if (!timeline.querySelector('[data-event="' + e.id + '"]')) timeline.append(timelineEntry(e));
  }
  const pane = document.querySelector("[data-logs]");
  if (job.logs.length) {
    const atBottom = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 4;
    pane.append(job.logs.map((l) => l.time + " " + l.level + " " + l.message + "\n").join(""));
    if (atBottom) pane.scrollTop = pane.scrollHeight;
  }
  const gallery = document.querySelector("[data-gallery]");
  for (const a of job.outputs) {
    if (gallery.querySelector('[data-artifact="' + CSS.escape(a.id) + '"]')) continue;
    const none = gallery.querySelector("[data-no-outputs]");
    if (none) none.remove();
    gallery.append(outputEntry(a));
  }
  applyMetrics(job);
}

// A job's page: one poll brings the state, progress, attempt and the events after the last one
// the page shows (with a redrawn loss chart when metric points came); a job that has ended is
// reloaded once, for its error, final metrics and actions.
async function pollJob(live) {
  const url = "/admin/live/jobs/" + encodeURIComponent(live.dataset.liveJob) + "?after=" + live.dataset.after;
  const job = await getJSON(url);
  if (job) {
    applyJob(job);
    live.dataset.after = job.cursor;
    if (!LIVE_STATES.has(job.state) && !job.more) { window.location.reload(); return; }
  }
  setTimeout(() => pollJob(live), job && job.more ? 0 : JOB_POLL_MS);
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
  if (document.querySelector("[data-job-row] [data-progress]")) setTimeout(pollJobs, JOB_POLL_MS);
  if (document.querySelector("[data-live-overview]")) setTimeout(pollOverview, OVERVIEW_POLL_MS);
  const live = document.querySelector("[data-live-job]");
  if (live && LIVE_STATES.has(live.dataset.stateNow)) setTimeout(() => pollJob(live), JOB_POLL_MS);
});
