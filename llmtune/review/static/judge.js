// The judging page: one pair at a time, verdicts by keyboard or button, saved at once.
// Every text is set with textContent: replies are model output, never markup.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // the pair on screen
let busy = false;

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response.json();
}

function renderProgress(p) {
  const share = p.to_judge ? p.judged / p.to_judge : 1;
  $("progress-fill").style.width = `${(100 * share).toFixed(1)}%`;
  const bar = $("progress");
  bar.setAttribute("aria-valuemax", String(p.to_judge));
  bar.setAttribute("aria-valuenow", String(p.judged));
  let text = `${p.judged} of ${p.to_judge} pairs judged`;
  if (p.withheld) text += ` · ${p.withheld} withheld (a reply was blocked by the moderation screen)`;
  $("progress-text").textContent = text;
  document.body.dataset.judged = String(p.judged);
  document.body.dataset.toJudge = String(p.to_judge);
}

function renderChat(messages) {
  const box = $("context");
  box.replaceChildren();
  for (const m of messages) {
    const row = document.createElement("div");
    row.className = `msg ${m.role}`;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = m.role === "system" ? "persona" : (m.name || m.role);
    row.append(role, document.createTextNode(typeof m.content === "string" ? m.content : JSON.stringify(m.content)));
    box.append(row);
  }
}

function render(state) {
  renderProgress(state.progress);
  current = state.item;
  document.body.dataset.item = current ? String(current.id) : "";
  $("judge").hidden = !current;
  $("done").hidden = Boolean(current);
  if (!current) {
    const w = state.progress.withheld;
    $("done-withheld").textContent = w ? `${w} pair(s) were not shown: the moderation screen blocked a reply.` : "";
    return;
  }
  renderChat(current.messages);
  $("left-text").textContent = current.left;
  $("right-text").textContent = current.right;
  $("note").value = "";
  for (const el of document.querySelectorAll(".reply")) el.classList.remove("picked");
}

function flash(text, isError = false) {
  const el = $("flash");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function setBusy(value) {
  busy = value;
  for (const b of document.querySelectorAll("button[data-choice]")) b.disabled = value;
}

const SAID = { left: "A is better", right: "B is better", tie: "tie", both_bad: "both bad" };

async function judge(choice) {
  if (!current || busy) return;
  setBusy(true);
  const side = { left: "left", right: "right" }[choice];
  if (side) $(side).classList.add("picked");
  try {
    const state = await call("POST", "/api/judgments", { item_id: current.id, choice, note: $("note").value });
    flash(`saved: ${SAID[choice]}`);
    render(state);
  } catch (err) {
    flash(`not saved: ${err.message}`, true);
  } finally {
    setBusy(false);
  }
}

async function undo() {
  if (busy) return;
  setBusy(true);
  try {
    render(await call("POST", "/api/undo"));
    flash("last verdict undone");
  } catch (err) {
    flash(`undo failed: ${err.message}`, true);
  } finally {
    setBusy(false);
  }
}

const KEYS = { a: "left", b: "right", t: "tie", x: "both_bad" };

document.addEventListener("keydown", (event) => {
  const note = $("note");
  if (event.target === note) {
    if (event.key === "Escape") note.blur();
    return; // typing a note
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  if (KEYS[key]) { event.preventDefault(); judge(KEYS[key]); }
  else if (key === "n" && current) { event.preventDefault(); note.focus(); }
  else if (key === "u") { event.preventDefault(); undo(); }
  else if (key === "r") { event.preventDefault(); window.location.href = "/results"; }
});

for (const button of document.querySelectorAll("button[data-choice]")) {
  button.addEventListener("click", () => judge(button.dataset.choice));
}

call("GET", "/api/state")
  .then((state) => { render(state); document.body.dataset.ready = "1"; })
  .catch((err) => { $("progress-text").textContent = `could not load the review: ${err.message}`; });
