"""A trajectory viewer: one self-contained HTML page (inline CSS and JS, no external resources)
for the trajectory JSONL files of a run directory (``eval/*.jsonl``, ``samples/step-*.jsonl``, ...).

Every trajectory shows its token stream span by span: model tokens (trained on) and observation and
template tokens (masked out) in different colours, then its tool calls with their results, reward,
status and stop reason. Filters narrow the list by status, reward and text.

Span texts come from, in order: the tokenizer, if one is given (each span decoded on its own); the
``segments`` a run's sample files carry; the ``span_text`` list the rollout stores in
``metadata``. Without any of them a span shows its token count.

A vision-language trajectory's images (``images`` records) are shown inline: the prompt's above the
token stream, each tool result's after the observation of its turn. Inline images are embedded as
data URIs; images stored by reference are linked relative to their JSONL file.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

TRAJECTORY_KEYS = {"id", "prompt_ids", "response_ids", "loss_mask", "turns"}


def find_trajectory_files(run_dir: str | Path) -> list[Path]:
    """Every ``*.jsonl`` under ``run_dir`` whose first record looks like a trajectory."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {str(root)!r} does not exist")
    found = []
    for path in sorted(root.rglob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and TRAJECTORY_KEYS <= record.keys():
            found.append(path)
    return found


def view_records(records: list[dict[str, Any]], tokenizer: Any = None, source: str = "") -> list[dict[str, Any]]:
    """The page's data for trajectory records: spans with their text, tool calls, outcome, images."""
    base = Path(source).parent.as_posix() if source else ""
    views = []
    for record in records:
        spans = record.get("turns", [])
        texts = _span_texts(record, tokenizer)
        prompt = record.get("prompt_text")
        if tokenizer is not None:
            prompt = tokenizer.decode(record["prompt_ids"])
        views.append({
            "id": record["id"], "group": record.get("group_id", ""), "source": source,
            "status": record.get("status", "ok"), "stop": record.get("stop_reason"), "reward": record.get("reward"),
            "answer": record.get("answer"), "version": record.get("policy_version", 0),
            "error": record.get("metadata", {}).get("error"), "dropped": record.get("metadata", {}).get("dropped"),
            "prompt": prompt if prompt is not None else f"({len(record['prompt_ids'])} prompt tokens)",
            "spans": [{"role": s["role"], "turn": s["turn"], "version": s.get("policy_version"),
                       "tokens": s["end"] - s["start"], "text": text} for s, text in zip(spans, texts)],
            "tools": record.get("tool_calls", []), "metrics": record.get("metrics", {}),
            "self_play": record.get("metadata", {}).get("self_play"),  # a search self-play role's record
            "model_tokens": sum(record.get("loss_mask", [])), "tokens": len(record.get("response_ids", [])),
            "images": [_image_view(image, base) for image in record.get("images", [])],
        })
    return views


def _image_view(image: dict[str, Any], base: str) -> dict[str, Any]:
    if image.get("data"):
        src = "data:image/png;base64," + image["data"]
    else:
        path = image.get("path") or ""
        src = path if Path(path).is_absolute() or base in ("", ".") else f"{base}/{path}"
    return {"turn": image.get("turn", -1), "src": src, "width": image.get("width"), "height": image.get("height")}


def _span_texts(record: dict[str, Any], tokenizer: Any) -> list[str]:
    spans, ids = record.get("turns", []), record.get("response_ids", [])
    if tokenizer is not None:
        return [tokenizer.decode(ids[s["start"]:s["end"]]) for s in spans]
    segments = record.get("segments")
    if segments and len(segments) == len(spans):
        return [segment["text"] for segment in segments]
    stored = record.get("metadata", {}).get("span_text")
    if stored and len(stored) == len(spans):
        return list(stored)
    return [f"[{s['end'] - s['start']} tokens]" for s in spans]


def load_run(run_dir: str | Path, tokenizer: Any = None, limit: int | None = None) -> list[dict[str, Any]]:
    views: list[dict[str, Any]] = []
    root = Path(run_dir)
    for path in find_trajectory_files(root):
        with path.open(encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        views.extend(view_records(records, tokenizer, str(path.relative_to(root))))
        if limit is not None and len(views) >= limit:
            return views[:limit]
    return views


def render_html(views: list[dict[str, Any]], title: str = "agentrl trajectories") -> str:
    """The page: the data as inline JSON (every ``<`` escaped, so no text can end the script element)."""
    data = json.dumps(_finite(views), ensure_ascii=False, allow_nan=False, default=str).replace("<", "\\u003c")
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)


def _finite(value: Any) -> Any:
    """NaN and infinities become null: JSON.parse accepts neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_viewer(run_dir: str | Path, out: str | Path | None = None, tokenizer: Any = None,
                 limit: int | None = None) -> tuple[Path, int]:
    """Write the page for a run directory; returns its path and the number of trajectories."""
    views = load_run(run_dir, tokenizer, limit)
    if not views:
        raise FileNotFoundError(f"no trajectory JSONL files under {run_dir}; run `agentrl eval` or `agentrl train` first")
    path = Path(out) if out is not None else Path(run_dir) / "trajectories.html"
    path.write_text(render_html(views, f"agentrl: {Path(run_dir).name}"), encoding="utf-8")
    return path, len(views)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 8px 16px; z-index: 1; }
header label { margin-right: 14px; }
main { padding: 12px 16px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 0 0 12px; padding: 10px 12px; }
.card h2 { font-size: 15px; margin: 0 0 6px; }
.badge { display: inline-block; padding: 0 6px; border-radius: 4px; margin-right: 6px; font-size: 12px; background: #eee; }
.s-ok { background: #d8f0d8; } .s-infra_error { background: #f6d0d0; } .s-truncated { background: #f5e6c4; }
.s-format_error { background: #f1d6ef; }
.s-engine_error, .s-template_error, .s-tool_error, .s-reward_error { background: #f6d0d0; }
.reason { color: #8b1a1a; font-size: 12.5px; }
.stream { white-space: pre-wrap; font: 12.5px/1.5 ui-monospace, monospace; border: 1px solid #eee; padding: 6px; }
.assistant { background: #dcebff; color: #0b3d91; }
.observation { background: #eee; color: #555; }
.template { background: #fff3c4; color: #8a6d00; }
.legend span { padding: 0 6px; margin-right: 6px; font: 12px ui-monospace, monospace; }
table { border-collapse: collapse; margin-top: 6px; font-size: 12.5px; }
td, th { border: 1px solid #e3e3e3; padding: 2px 6px; text-align: left; vertical-align: top; }
details summary { cursor: pointer; color: #555; }
figure.image { display: inline-block; margin: 4px 8px 4px 0; vertical-align: top; }
figure.image img { max-width: 320px; max-height: 320px; border: 1px solid #ccc; image-rendering: pixelated; }
figure.image figcaption { font-size: 11.5px; color: #555; }
#errors { color: #b00; white-space: pre-wrap; }
</style></head>
<body>
<header>
<strong>__TITLE__</strong> &middot; <span id="viewer-status">loading</span>
<div>
<label>status <select id="f-status"><option value="">all</option></select></label>
<label>reward <select id="f-reward"><option value="">all</option><option value="pos">&gt; 0</option>
<option value="zero">= 0</option><option value="none">none</option></select></label>
<label>min reward <input id="f-min" type="number" step="0.1" style="width:5em"></label>
<label>search <input id="f-text" type="search" placeholder="id, answer, text"></label>
<span class="legend"><span class="assistant">model tokens (trained)</span><span class="observation">observation (masked)</span><span class="template">template (masked)</span></span>
</div>
<div id="errors"></div>
</header>
<main id="list"></main>
<script type="application/json" id="data">__DATA__</script>
<script>
window.onerror = function (message, source, line) {
  var box = document.getElementById("errors");
  box.textContent += "error: " + message + " (line " + line + ")\\n";
  document.body.setAttribute("data-errors", "yes");
};
(function () {
  var data = JSON.parse(document.getElementById("data").textContent);
  var list = document.getElementById("list");
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function selfPlay(s) {
    // search self-play: a proposal with its question, RAG check and the solver's attempts; or a solver's problem
    var box = el("div", "self-play");
    if (s.role !== "proposer") {
      box.appendChild(el("div", null, "solver (" + s.source + " problem) \\u00b7 question: " + s.question + " \\u00b7 gold " + s.answer));
      return box;
    }
    box.appendChild(el("div", null, "proposer \\u00b7 answer " + s.answer + " \\u00b7 hops " + s.hops));
    box.appendChild(el("div", null, "question: " + (s.question === null ? "(none)" : s.question)));
    var rag = s.rag_checked ? "RAG check answered " + (s.rag_answer === null ? "nothing" : s.rag_answer) : "no RAG check";
    box.appendChild(el("div", null, (s.valid ? "valid" : "rejected: " + s.reason) + " \\u00b7 " + rag));
    (s.solver_attempts || []).forEach(function (a, i) {
      var on = s.slot_source && s.slot_source !== "proposed" ? " (at a " + s.slot_source + " problem)" : "";
      box.appendChild(el("div", null, "solver attempt " + (i + 1) + on + ": " + (a.answer === null ? "(no answer)" : a.answer) + " \\u00b7 reward " + a.reward));
    });
    return box;
  }
  function card(t) {
    var box = el("div", "card");
    var title = el("h2", null, t.id);
    box.appendChild(title);
    var meta = el("div");
    meta.appendChild(el("span", "badge s-" + t.status, "status " + t.status));
    meta.appendChild(el("span", "badge", "stop " + t.stop));
    meta.appendChild(el("span", "badge", "reward " + (t.reward === null ? "none" : t.reward)));
    meta.appendChild(el("span", "badge", "policy v" + t.version));
    meta.appendChild(el("span", "badge", t.model_tokens + "/" + t.tokens + " tokens trained"));
    if (t.dropped) meta.appendChild(el("span", "badge s-infra_error", "group dropped"));
    if (t.source) meta.appendChild(el("span", "badge", t.source));
    box.appendChild(meta);
    if (t.error) box.appendChild(el("div", "reason", t.status + ": " + t.error));
    if (t.dropped) box.appendChild(el("div", "reason", "left out of the loss: " + t.dropped));
    if (t.answer !== null && t.answer !== undefined) box.appendChild(el("div", null, "answer: " + t.answer));
    var prompt = el("details");
    prompt.appendChild(el("summary", null, "prompt"));
    prompt.appendChild(el("div", "stream", t.prompt));
    box.appendChild(prompt);
    var numbered = t.images.map(function (image, i) { image.index = i; return image; });
    function images(parent, turn) {
      numbered.filter(function (image) { return image.turn === turn && !image.shown; }).forEach(function (image) {
        image.shown = true;
        var figure = el("figure", "image");
        var img = el("img");
        img.onload = function () { img.setAttribute("data-loaded", String(img.naturalWidth)); };
        img.src = image.src;
        img.alt = "image " + image.index;
        figure.appendChild(img);
        figure.appendChild(el("figcaption", null, "image " + image.index + " \u00b7 " + image.width + "x" + image.height + " \u00b7 " + (turn < 0 ? "prompt" : "tool result, turn " + turn)));
        parent.appendChild(figure);
      });
    }
    images(box, -1);
    var stream = el("div", "stream");
    t.spans.forEach(function (s, i) {
      var span = el("span", s.role, s.text);
      span.title = s.role + ", turn " + s.turn + ", " + s.tokens + " tokens" + (s.version === null ? "" : ", policy v" + s.version);
      stream.appendChild(span);
      var next = t.spans[i + 1];
      if (s.role !== "assistant" && (!next || next.turn !== s.turn || next.role === "assistant")) images(stream, s.turn);
    });
    numbered.forEach(function (image) { if (!image.shown) images(stream, image.turn); });
    box.appendChild(stream);
    if (t.tools.length) {
      var table = el("table");
      var head = el("tr");
      ["turn", "tool", "arguments", "status", "latency ms", "error"].forEach(function (h) { head.appendChild(el("th", null, h)); });
      table.appendChild(head);
      t.tools.forEach(function (c) {
        var row = el("tr");
        [c.turn, c.tool || "(format)", JSON.stringify(c.arguments), c.status, (c.latency_s * 1000).toFixed(1), c.error || ""]
          .forEach(function (v) { row.appendChild(el("td", null, v)); });
        table.appendChild(row);
      });
      box.appendChild(table);
    }
    if (t.self_play) box.appendChild(selfPlay(t.self_play));
    var keys = Object.keys(t.metrics);
    if (keys.length) box.appendChild(el("div", null, keys.map(function (k) { return k + " " + t.metrics[k]; }).join(" \\u00b7 ")));
    return box;
  }
  var statuses = {};
  data.forEach(function (t) { statuses[t.status] = true; });
  var select = document.getElementById("f-status");
  Object.keys(statuses).sort().forEach(function (s) { var o = el("option", null, s); o.value = s; select.appendChild(o); });
  var cards = data.map(function (t) { var c = card(t); list.appendChild(c); return c; });
  function haystack(t) { return (t.id + " " + (t.answer || "") + " " + t.spans.map(function (s) { return s.text; }).join("")).toLowerCase(); }
  var texts = data.map(haystack);
  function apply() {
    var status = select.value, reward = document.getElementById("f-reward").value;
    var min = parseFloat(document.getElementById("f-min").value), text = document.getElementById("f-text").value.toLowerCase();
    var shown = 0;
    data.forEach(function (t, i) {
      var ok = (!status || t.status === status)
        && (!reward || (reward === "pos" && t.reward > 0) || (reward === "zero" && t.reward === 0) || (reward === "none" && t.reward === null))
        && (isNaN(min) || (t.reward !== null && t.reward >= min))
        && (!text || texts[i].indexOf(text) >= 0);
      cards[i].style.display = ok ? "" : "none";
      if (ok) shown += 1;
    });
    document.getElementById("viewer-status").textContent = "showing " + shown + " of " + data.length + " trajectories";
    document.body.setAttribute("data-shown", String(shown));
  }
  var initial = {};  // filters from the address, e.g. trajectories.html#status=ok&reward=pos
  location.hash.replace(/^#/, "").split("&").forEach(function (pair) {
    var kv = pair.split("=");
    if (kv[0]) initial[kv[0]] = decodeURIComponent(kv[1] || "");
  });
  [["status", "f-status"], ["reward", "f-reward"], ["min", "f-min"], ["text", "f-text"]].forEach(function (p) {
    if (initial[p[0]] !== undefined) document.getElementById(p[1]).value = initial[p[0]];
  });
  ["f-status", "f-reward", "f-min", "f-text"].forEach(function (id) {
    document.getElementById(id).addEventListener("input", apply);
  });
  apply();
  document.body.setAttribute("data-rendered", String(data.length));
})();
</script>
</body></html>
"""
