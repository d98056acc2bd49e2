// The dashboard's live parts. No framework and nothing fetched from elsewhere: every
// page is whole without this file; it only keeps lists, statuses and logs current.
// Data goes into the page as text (textContent), never as markup.
"use strict";

(function () {
  const RUNS_EVERY_MS = 2000;
  const RUN_EVERY_MS = 1000;

  async function getJson(url) {
    const answer = await fetch(url, {credentials: "same-origin", cache: "no-store",
                                     headers: {"Accept": "application/json"}});
    if (answer.status === 401) {  // signed out, expired or revoked: to the sign-in page
      window.location.assign("/ui/login");
      throw new Error("signed out");
    }
    if (!answer.ok) { throw new Error("HTTP " + answer.status); }
    return answer.json();
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function badge(status) {
    return el("span", "status status-" + status.replace(/[^a-z_]/g, ""), status);
  }

  function when(iso) {
    if (!iso) { return "–"; }
    const d = new Date(iso);
    return d.toISOString().slice(0, 19).replace("T", " ") + "Z";
  }

  function took(run) {
    if (!run.started_at) { return "–"; }
    const end = run.finished_at ? new Date(run.finished_at) : new Date();
    const s = Math.max(0, (end - new Date(run.started_at)) / 1000);
    if (s < 1) { return Math.round(s * 1000) + " ms"; }
    if (s < 60) { return s.toFixed(1) + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " m " + String(Math.floor(s % 60)).padStart(2, "0") + " s"; }
    return Math.floor(s / 3600) + " h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + " m";
  }

  function statusCell(cell, run) {
    cell.replaceChildren(badge(run.status));
    if (run.error_code) {
      cell.append(" ", el("span", "code", run.error_code));
    }
  }

  function newRow(run) {
    const row = el("tr");
    row.dataset.runId = run.id;
    const link = el("a", "mono", run.id);
    link.href = "/ui/runs/" + encodeURIComponent(run.id);
    const idCell = el("td");
    idCell.append(link);
    const status = el("td");
    status.dataset.cell = "status";
    statusCell(status, run);
    const proc = el("td", null, run.processor + " ");
    proc.append(el("span", "muted", run.version));
    const labels = el("td");
    Object.keys(run.labels).sort().forEach(function (key) {
      labels.append(el("span", "label", key + "=" + run.labels[key]), " ");
    });
    const attempt = el("td", null, run.attempt + "/" + run.max_attempts);
    attempt.dataset.cell = "attempt";
    const created = el("td", null, when(run.created_at));
    const duration = el("td", null, took(run));
    duration.dataset.cell = "took";
    row.append(idCell, status, proc, labels, attempt, created, duration);
    return row;
  }

  function liveRuns(table) {
    const body = table.tBodies[0];
    const firstPage = table.dataset.firstPage === "yes";
    const note = document.getElementById("live-note");
    if (note) { note.hidden = false; }
    async function poll() {
      const rows = Array.from(body.rows);
      const ids = rows.map(function (r) { return r.dataset.runId; });
      const url = new URL(table.dataset.live, window.location.href);
      url.searchParams.set("ids", ids.slice(0, 200).join(","));
      if (firstPage) {
        url.searchParams.set("newest", ids.length ? ids[0] : "");
      } else {
        url.searchParams.set("newest", "-");  // no additions past the first page
      }
      try {
        const data = await getJson(url);
        data.runs.forEach(function (run) {
          const row = body.querySelector('tr[data-run-id="' + CSS.escape(run.id) + '"]');
          if (!row) { return; }
          statusCell(row.querySelector('[data-cell="status"]'), run);
          row.querySelector('[data-cell="attempt"]').textContent = run.attempt + "/" + run.max_attempts;
          row.querySelector('[data-cell="took"]').textContent = took(run);
        });
        data.new.slice().reverse().forEach(function (run) {
          if (!body.querySelector('tr[data-run-id="' + CSS.escape(run.id) + '"]')) {
            body.prepend(newRow(run));
          }
        });
        const empty = document.getElementById("no-runs");
        if (empty && body.rows.length) { empty.hidden = true; }
      } catch (e) { /* a missed poll: the next one catches up */ }
      window.setTimeout(poll, RUNS_EVERY_MS);
    }
    window.setTimeout(poll, RUNS_EVERY_MS);
  }

  function liveRun(root) {
    const log = document.getElementById("log");
    const following = document.getElementById("log-following");
    let offset = Number(root.dataset.offset || "0");
    let status = root.dataset.status;
    if (following) { following.hidden = false; }
    async function poll() {
      let again = RUN_EVERY_MS;
      try {
        const url = new URL(root.dataset.live, window.location.href);
        url.searchParams.set("offset", String(offset));
        const data = await getJson(url);
        if (data.log) {
          const nearEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
          log.append(document.createTextNode(data.log));
          if (nearEnd) { log.scrollTop = log.scrollHeight; }
        }
        offset = data.next_offset;
        if (data.log_truncated) { document.getElementById("log-truncated").hidden = false; }
        document.getElementById("run-attempt").textContent = String(data.attempt);
        document.getElementById("run-started").textContent = data.started_at;
        if (data.status !== status) {
          status = data.status;
          document.getElementById("run-status").replaceChildren(badge(status));
        }
        const cancel = document.getElementById("cancel-form");
        if (cancel && !data.can_cancel) { cancel.hidden = true; }
        if (data.more) { again = 0; }
        else if (data.terminal) {
          if (following) { following.hidden = true; }
          document.getElementById("run-ended").hidden = false;
          window.setTimeout(function () { window.location.reload(); }, 1500);
          return;  // the reloaded page shows the result and the artifacts
        }
      } catch (e) { /* a missed poll: the next one catches up */ }
      window.setTimeout(poll, again);
    }
    window.setTimeout(poll, RUN_EVERY_MS);
  }

  function selectAll(box) {
    box.hidden = false;
    box.addEventListener("change", function () {
      document.querySelectorAll('#bulk-replay input[name="run"]').forEach(function (c) {
        c.checked = box.checked;
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const runs = document.getElementById("runs");
    if (runs && runs.dataset.live) { liveRuns(runs); }
    const run = document.getElementById("run");
    if (run && run.dataset.terminal === "no") { liveRun(run); }
    const box = document.getElementById("select-all");
    if (box) { selectAll(box); }
    const refresh = document.querySelector("[data-refresh]");
    if (refresh) {
      window.setTimeout(function () { window.location.reload(); },
                        Number(refresh.dataset.refresh) * 1000);
    }
  });
})();
