// Warren's web UI: live rows and logs over server-sent events, and a few small behaviours.
// htmx does the requests; this file only reacts to what the server sends.
"use strict";

// An error answer (4xx/5xx) is shown, not swapped into the page: in the form's own slot when
// the request came from a form that has one, else at the top of the page.
document.body.addEventListener("htmx:beforeSwap", (e) => {
  const status = e.detail.xhr.status;
  if (status < 400) return;
  e.detail.shouldSwap = false;
  const page = new DOMParser().parseFromString(e.detail.xhr.responseText, "text/html");
  const message = page.querySelector(".error")?.textContent || `${status} ${e.detail.xhr.statusText}`;
  // The element that asked (the swap's `elt` is its target).
  const form = (e.detail.requestConfig?.elt || e.detail.elt).closest("form");
  const slot = form?.querySelector("[data-errors]") || document.getElementById("flash");
  slot.textContent = message;
});
document.body.addEventListener("htmx:beforeRequest", (e) => {
  const form = (e.detail.requestConfig?.elt || e.detail.elt).closest("form");
  const slot = form?.querySelector("[data-errors]") || document.getElementById("flash");
  if (slot) slot.textContent = "";
});

// Buttons that open and close dialogs, copy text, and switch tabs.
document.addEventListener("click", (e) => {
  const t = e.target.closest("[data-open],[data-close],[data-copy],[data-tab]");
  if (!t) return;
  if (t.dataset.open) document.getElementById(t.dataset.open).showModal();
  if (t.hasAttribute("data-close")) t.closest("dialog").close();
  if (t.dataset.copy) {
    navigator.clipboard?.writeText(t.dataset.copy);
    t.textContent = "Copied";
  }
  if (t.dataset.tab) {
    for (const tab of t.parentElement.children) tab.removeAttribute("aria-selected");
    t.setAttribute("aria-selected", "true");
    const shown = document.getElementById(t.dataset.tab);
    for (const log of shown.parentElement.querySelectorAll("pre.log")) {
      log.hidden = log !== shown;
      if (log.hidden) unfollow(log);
      else follow(log);
    }
  }
});

// The image field is for the "an image…" choice only.
const source = document.getElementById("new-source");
if (source) {
  const sync = () => {
    const field = document.querySelector(".for-image");
    field.hidden = source.value !== "image";
    field.querySelector("input").required = source.value === "image";
  };
  source.addEventListener("change", sync);
  sync();
}

// Rows that the server re-renders when their workspace changes (`row`), or removes (`gone`).
for (const rows of document.querySelectorAll("[data-live]")) {
  const events = new EventSource(rows.dataset.live);
  events.addEventListener("row", (e) => {
    const template = document.createElement("template");
    template.innerHTML = e.data.trim();
    const row = template.content.firstElementChild;
    const old = document.getElementById(row.id);
    if (old?.outerHTML === row.outerHTML) return;
    if (old) old.replaceWith(row);
    else rows.append(row);
    htmx.process(row);
  });
  // Every row has been sent once: from here on only changes come.
  events.addEventListener("synced", () => (rows.dataset.synced = "true"));
  events.addEventListener("gone", (e) => document.getElementById(e.data)?.remove());
}

// A task's output, followed while its tab is shown (a browser holds only six connections
// to a server over HTTP/1.1), from where it was left: after a dropped connection or a switch
// of tabs it goes on from the last byte received, so no line is lost or shown twice.
const following = new Map();
function follow(log) {
  if (following.has(log) || log.dataset.ended) return;
  const state = { offset: Number(log.dataset.offset || 0), events: null, retry: null };
  following.set(log, state);
  const open = () => {
    const events = new EventSource(`${log.dataset.follow}?offset=${state.offset}`);
    state.events = events;
    events.addEventListener("log", (e) => {
      const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.append(JSON.parse(e.data));
      state.offset = Number(e.lastEventId);
      log.dataset.offset = String(state.offset);
      if (stick) log.scrollTop = log.scrollHeight;
    });
    // A prebuild's log also names its steps: each `step` adds one to its list, `cached` says
    // the last came from the cache, and `end` says how the prebuild ended.
    const steps = log.dataset.steps && document.getElementById(log.dataset.steps);
    if (steps) {
      events.addEventListener("step", (e) => {
        const step = document.createElement("li");
        step.textContent = JSON.parse(e.data);
        steps.append(step);
      });
      events.addEventListener("cached", () => steps.lastElementChild?.classList.add("cached"));
    }
    events.addEventListener("end", (e) => {
      log.dataset.ended = "true";
      if (steps) steps.dataset.state = JSON.parse(e.data);
      unfollow(log);
    });
    events.addEventListener("problem", (e) => {
      events.close();
      log.dataset.problem = JSON.parse(e.data);
      state.retry = setTimeout(open, 5000);
    });
    events.onerror = () => {
      events.close();
      state.retry = setTimeout(open, 1000);
    };
  };
  open();
}
function unfollow(log) {
  const state = following.get(log);
  if (!state) return;
  clearTimeout(state.retry);
  state.events?.close();
  following.delete(log);
}
for (const log of document.querySelectorAll("pre[data-follow]")) {
  if (!log.hidden) follow(log);
}
