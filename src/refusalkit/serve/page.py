"""The one page `refusalkit serve` shows: a prompt box, two answer columns, and which edit "edited" is
with that edit's own measured numbers (``report.active_edit``).

Everything the run or the model supplies is HTML-escaped here (server side) or set with ``textContent``
(in the browser), so neither a run's text nor an answer is ever parsed as HTML.
"""

from __future__ import annotations

import re
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from refusalkit.report.active_edit import EditNumbers

# Settings the right-hand column can show (value sent to the server, label on the page).
RIGHT_CHOICES = [
    ("edited", "edited"),
    ("ablation", "ablation hooks"),
    ("add -1", "add -1 (weaker refusal)"),
    ("add 1", "add +1 (stronger refusal)"),
]


def edit_rows(model: str, numbers: EditNumbers | None) -> list[tuple[str, str]]:
    """(label, value) rows: the model, which edit "edited" is, and that edit's own measured numbers."""
    rows = [("model", model)]
    if numbers is None:
        return [*rows, ("edited", "no run folder, so no measured numbers")]
    rows.append(("edited", f"{numbers.label} (--edit {numbers.choice})"))
    rows += [(r.label, f"original {r.original} → edited {r.edited}") for r in numbers.measured()]
    return [*rows, ("numbers from", numbers.source)]


def render_page(
    *, model: str, edited_label: str, rows: list[tuple[str, str]], has_report: bool, max_new_tokens: int
) -> str:
    table = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    if not rows:
        table = '<tr><td colspan="2">no measured numbers in this run folder yet</td></tr>'
    report = (
        '<a id="report" href="/report.html" target="_blank">the run\'s full report</a>'
        if has_report
        else "no report.html yet (build it with <code>refusalkit report RUN_DIR</code>)"
    )
    options = "".join(f'<option value="{escape(v)}">{escape(t)}</option>' for v, t in RIGHT_CHOICES)
    fill = {
        "model": escape(model),
        "edited": escape(edited_label),
        "table": table,
        "report": report,
        "options": options,
        "max": str(int(max_new_tokens)),
    }
    # One pass, so a filled-in value that happens to contain "{{...}}" is never substituted again.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: fill[m.group(1)], _TEMPLATE)


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>refusalkit: {{model}}, original and edited</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d2230; background: #f6f7f9; }
header { background: #1d2230; color: #fff; padding: 14px 24px; }
header h1 { font-size: 19px; margin: 0; } header p { margin: 4px 0 0; color: #c9cfdb; font-size: 13px; }
main { padding: 16px 24px; max-width: 1280px; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 6px; }
th { text-align: left; font-weight: 500; color: #55607a; padding: 2px 16px 2px 0; } td { padding: 2px 0; }
form { margin: 14px 0; }
textarea { width: 100%; box-sizing: border-box; font: inherit; padding: 8px; border: 1px solid #b9c0ce; border-radius: 6px; }
.bar { display: flex; gap: 10px; align-items: center; margin-top: 8px; }
button { font: inherit; padding: 6px 18px; border-radius: 6px; border: 0; background: #2f5bd3; color: #fff; cursor: pointer; }
button:disabled { background: #8a9ccc; cursor: progress; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.col h2 { font-size: 15px; margin: 0 0 6px; } .note { color: #55607a; font-weight: 400; font-size: 13px; }
.answer { white-space: pre-wrap; overflow-wrap: anywhere; min-height: 120px; margin: 0; padding: 10px;
  background: #fff; border: 1px solid #d5dae3; border-radius: 6px; font: 14px/1.45 ui-monospace, monospace; }
.answer[data-state="streaming"] { border-color: #2f5bd3; }
#status { color: #a3262e; } footer { color: #55607a; font-size: 12px; margin-top: 14px; }
</style></head>
<body>
<header><h1>{{model}}: the original and the edited model, side by side</h1>
<p>edited = {{edited}}</p></header>
<main>
<table id="headline">{{table}}</table>
<div>{{report}}</div>
<form id="ask-form">
<textarea id="prompt" rows="3" placeholder="Type a prompt; Ctrl+Enter asks both models"></textarea>
<div class="bar"><button id="ask" type="submit">Ask both</button>
<label>right column: <select id="right-setting">{{options}}</select></label>
<span id="status" role="status"></span></div>
</form>
<div class="cols">
<section class="col"><h2>original <span class="note" id="left-note"></span></h2>
<pre class="answer" id="left" data-state="idle"></pre></section>
<section class="col"><h2><span id="right-label">edited</span> <span class="note" id="right-note"></span></h2>
<pre class="answer" id="right" data-state="idle"></pre></section>
</div>
<footer>Greedy answers of at most {{max}} new tokens, one model at a time (original first).
Nothing you type or the models answer is logged or stored.</footer>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const boxes = { left: $("left"), right: $("right") };
function mark(side, state, note) { boxes[side].dataset.state = state; $(side + "-note").textContent = note; }
function handle(ev) {
  if (ev.text !== undefined) boxes[ev.side].textContent += ev.text;  // textContent: never parsed as HTML
  else if (ev.event === "start") mark(ev.side, "streaming", "answering…");
  else if (ev.event === "end") mark(ev.side, "done", ev.seconds.toFixed(1) + " s");
  else if (ev.event === "error") $("status").textContent = "error: " + ev.message;
}
async function ask(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) { $("prompt").focus(); return; }
  $("ask").disabled = true;
  $("status").textContent = "";
  $("right-label").textContent = $("right-setting").selectedOptions[0].text;
  for (const side of ["left", "right"]) { boxes[side].textContent = ""; mark(side, "waiting", "waiting…"); }
  try {
    const res = await fetch("/api/answer", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: prompt, right: $("right-setting").value }) });
    if (!res.ok) throw new Error(await res.text());
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\\n")) >= 0) { handle(JSON.parse(buf.slice(0, nl))); buf = buf.slice(nl + 1); }
    }
  } catch (err) {
    $("status").textContent = "error: " + err.message;
  } finally {
    $("ask").disabled = false;
  }
}
$("ask-form").addEventListener("submit", ask);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask-form").requestSubmit();
});
</script>
</body></html>
"""
