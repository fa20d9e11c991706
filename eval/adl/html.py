"""The lens's report page: one self-contained HTML file (no scripts, no external resources; plots embedded as
data URIs) with, per layer and position, the logit lens and Patchscope of δ and the controls, relevance,
steering samples and the causal effect (docs/methods.md §10.8)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from crosscoder.eval.adl.differences import VECTORS

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
code.tok { background: #f1f1f1; border-radius: 3px; padding: 0 3px; margin: 1px; display: inline-block;
           font-size: 12px; white-space: pre; }
code.tok.relevant { background: #ffe0b3; }
.sample { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; margin: 2px 0 6px;
          border-left: 3px solid #ddd; padding-left: 6px; }
.steered { border-left-color: #cc3311; }
img { max-width: 49%; margin-right: 1%; }
section.position { border-top: 1px solid #ddd; margin-top: 1.5em; }
"""

NAMES = {"delta": "δ = chat − base", "base_mean": "base mean (control)", "chat_mean": "chat mean (control)"}


def _tokens(entry: dict[str, Any], limit: int, relevant: set[str] = frozenset()) -> str:
    pieces = []
    for token, prob in list(zip(entry["tokens"], entry["probs"], strict=True))[:limit]:
        classes = "tok relevant" if token in relevant else "tok"
        shown = html.escape(json.dumps(token, ensure_ascii=False)[1:-1])
        pieces.append(f'<code class="{classes}" title="p = {prob:.4f}">{shown}</code>')
    return "".join(pieces)


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _relevance_cell(entry: dict[str, Any], reader: str, kind: str) -> str:
    relevance = entry.get("relevance")
    if not isinstance(relevance, dict):
        return "–"
    scores = relevance[reader][kind]
    cell = f"{scores['share']:.2f} ({scores['weighted']:.2f} weighted)"
    if "llm" in scores:
        llm = scores["llm"]
        cell += f"<br>LLM: {llm['share']:.2f} ({llm['weighted']:.2f} weighted; {html.escape(llm['labelled_by'])})"
    return cell


def _relevant(entry: dict[str, Any], reader: str, kind: str) -> set[str]:
    relevance = entry.get("relevance")
    return set(relevance[reader][kind]["relevant"]) if isinstance(relevance, dict) else set()


def _lens_table(entry: dict[str, Any]) -> str:
    rows = []
    for kind in VECTORS:
        lens, scope = entry["logit_lens"][kind], entry["patchscope"][kind]
        rows.append(
            f"<tr><th>{NAMES[kind]}</th>"
            f"<td>{_tokens(lens, 20, _relevant(entry, 'logit_lens', kind))}</td>"
            f"<td>{_relevance_cell(entry, 'logit_lens', kind)}</td>"
            f"<td>{_tokens(lens['inverse'], 10)}</td>"
            f"<td>scale {scope['scale']:g}<br>{_tokens(scope, 20, _relevant(entry, 'patchscope', kind))}</td>"
            f"<td>{_relevance_cell(entry, 'patchscope', kind)}</td></tr>"
        )
    header = (
        "<tr><th>vector</th><th>logit lens (top 20)</th><th>relevance</th><th>inverse (−v, top 10)</th>"
        "<th>Patchscope (chosen scale)</th><th>relevance</th></tr>"
    )
    return f'<table class="lens">{header}{"".join(rows)}</table>'


def _steering(steering: Any) -> str:
    if not isinstance(steering, dict):
        return f"<p>Steering: {html.escape(str(steering))}</p>"
    thresholds = ", ".join(f"{search['strength']:.3g}" for search in steering["search"])
    parts = [
        f"<h4>Steering with δ (strength {steering['strength']:.3g} × the chat mean norm: the mean of the thresholds "
        f"{thresholds} found on the first prompts)</h4>"
    ]
    similarity = steering.get("similarity")
    if similarity:
        parts.append(
            f"<p>Bag-of-tokens cosine with the finetuning data: steered {similarity['steered']:.3f}, unsteered "
            f"{similarity['unsteered']:.3f}</p>"
        )
    for sample in steering["samples"]:
        parts.append(f"<p><b>{html.escape(sample['prompt'])}</b></p>")
        for text in sample["steered"][:2]:
            parts.append(f'<div class="sample steered">steered: {html.escape(text)}</div>')
        for text in sample["unsteered"][:1]:
            parts.append(f'<div class="sample">unsteered: {html.escape(text)}</div>')
    return "".join(parts)


def _causal_row(name: str, e: dict[str, Any]) -> str:
    controls = "".join(
        f"<td>{e[key]['mean']:.4f} ± {e[key]['std']:.4f}</td>" if key in e else "<td>–</td>"
        for key in (
            "random_project_out",
            "random_difference_project_out",
            "random_base_projection",
            "random_difference_base_projection",
        )
    )
    return (
        f"<tr><th>{html.escape(name)}</th><td>{e['tokens']}</td><td>{e['chat']:.4f}</td><td>{e['project_out']:.4f}</td>"
        f"<td>{e['base_projection']:.4f}</td>{controls}</tr>"
    )


def _causal(causal: Any) -> str:
    if not isinstance(causal, dict):
        return f"<p>Causal effect: {html.escape(str(causal))}</p>"
    header = (
        "<tr><th>data</th><th>tokens</th><th>chat</th><th>δ projected out</th><th>δ set to base</th>"
        "<th>random directions projected out (mean ± std)</th><th>random differences projected out</th>"
        "<th>random directions set to base</th><th>random differences set to base</th></tr>"
    )
    rows = []
    for name, e in causal.items():
        rows.append(_causal_row(name, e))
        if "after_first" in e:
            rows.append(_causal_row(f"{name}, after token {e['after_first']['skip']}", e["after_first"]))
    return f'<h4>Causal effect (chat model loss, nats)</h4><table class="causal">{header}{"".join(rows)}</table>'


def render_html(report: dict[str, Any], path: Path, images: list[Path] = ()) -> Path:
    """Write the report page for ``report`` (``report.json``'s content) to ``path``."""
    counts = report["counts"]
    summary = (
        f"<p>Base <code>{html.escape(report['base_model'])}</code>, chat <code>{html.escape(report['chat_model'])}"
        f"</code>; general data {html.escape(', '.join(report['datasets']))}; finetuning data "
        f"{html.escape(str(report['domain_data']))}.</p>"
        f"<p>{counts['samples']} texts averaged over their first {report['n_positions']} tokens "
        f"({counts['dropped_short']} dropped as shorter). Grader: {html.escape(str(report['grader']))}.</p>"
    )
    sections = []
    for layer, result in report["results"].items():
        norms = report["norms"]
        norms = f"mean activation norm: base {norms['base'][layer]:.3f}, chat {norms['chat'][layer]:.3f}"
        sections.append(f'<h2 id="layer-{layer}">Layer {layer}</h2><p>{norms}</p>')
        for position, entry in result["positions"].items():
            sections.append(
                f'<section class="position" id="layer-{layer}-position-{position}">'
                f"<h3>Layer {layer}, position {position} (‖δ‖ = {result['difference_norms'][int(position)]:.3f})</h3>"
                f"{_lens_table(entry)}{_steering(entry['steering'])}{_causal(entry['causal_effect'])}</section>"
            )
    chat_data = report.get("chat_data")
    if chat_data:
        chat_counts = chat_data["counts"]
        sections.append(
            f'<h2 id="chat-data">Chat data: {html.escape(str(chat_data["file"]))}</h2><p>{chat_counts["samples"]} '
            f"conversations averaged around the first assistant turn ({chat_counts['dropped_short']} dropped as "
            "shorter).</p>"
        )
        for layer, result in chat_data["results"].items():
            for position, entry in result["positions"].items():
                row = int(position) - chat_data["first_position"]
                sections.append(
                    f'<section class="position" id="chat-layer-{layer}-position-{position}"><h3>Chat data, layer '
                    f"{layer}, position {position}: {html.escape(entry['label'])} (‖δ‖ = "
                    f"{result['difference_norms'][row]:.3f})</h3>{_lens_table(entry)}</section>"
                )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Activation Difference Lens</title><style>{STYLE}</style></head><body>"
        f"<h1>Activation Difference Lens</h1>{summary}"
        f'<div class="plots">{"".join(_image(image) for image in images)}</div>'
        f"{''.join(sections)}</body></html>"
    )
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)
