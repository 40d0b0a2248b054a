// The results page: RUN_A's win rate with its 95% interval, ties, the plot, every pair unblinded.
"use strict";

const $ = (id) => document.getElementById(id);

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

const VERDICT_TEXT = (r) => ({
  run_a: `${r.label_a} better`, run_b: `${r.label_b} better`, tie: "tie", both_bad: "both bad",
});

function render(r) {
  document.title = `llmtune review: ${r.label_a} vs ${r.label_b}`;
  $("title").textContent = `Results: ${r.label_a} vs ${r.label_b}`;
  $("summary").textContent = r.summary;
  $("h-a").textContent = `${r.label_a} better`;
  $("h-b").textContent = `${r.label_b} better`;
  $("o-a").textContent = r.label_a;
  $("o-b").textContent = r.label_b;
  $("c-rate").textContent = r.win_rate_a === null ? "–"
    : `${r.win_rate_a.toFixed(2)} [${r.ci_low.toFixed(2)}, ${r.ci_high.toFixed(2)}]`;
  $("c-a").textContent = r.wins_a;
  $("c-tie").textContent = r.ties;
  $("c-bad").textContent = r.both_bad;
  $("c-b").textContent = r.wins_b;
  $("c-judged").textContent = `${r.judged} / ${r.to_judge}`;
  $("c-withheld").textContent = r.withheld;
  $("bias").textContent = r.decisive
    ? `Position check: the left reply won ${r.left_chosen} of ${r.decisive} decisive verdicts (about half is expected).`
    : "";
  $("plot").src = `/results.png?t=${Date.now()}`;

  const names = VERDICT_TEXT(r);
  const body = document.querySelector("#outcomes tbody");
  body.replaceChildren();
  for (const o of r.outcomes) {
    const tr = document.createElement("tr");
    tr.dataset.verdict = o.verdict || "";
    const withheldA = o.reply_a === null, withheldB = o.reply_b === null;
    const a = cell(withheldA ? "withheld by the moderation screen" : o.reply_a, withheldA ? "reply-cell withheld" : "reply-cell");
    const b = cell(withheldB ? "withheld by the moderation screen" : o.reply_b, withheldB ? "reply-cell withheld" : "reply-cell");
    if (o.verdict === "run_a") a.classList.add("winner");
    if (o.verdict === "run_b") b.classList.add("winner");
    const verdict = o.verdict ? names[o.verdict] : (o.withheld.length ? "not shown" : "not judged yet");
    tr.append(cell(String(o.id)), cell(`${o.prompt}\n(${o.source})`), a, b,
              cell(verdict, `verdict ${o.verdict || "none"}`), cell(o.note));
    body.append(tr);
  }
  document.body.dataset.ready = "1";
}

fetch("/api/results")
  .then((response) => { if (!response.ok) throw new Error(response.statusText); return response.json(); })
  .then(render)
  .catch((err) => { $("summary").textContent = `could not load the results: ${err.message}`; });
