"""A static, self-contained HTML dashboard of latents: a table and each latent's top contexts with the
latent's activation shown as token highlighting. No scripts and no external resources; plots are embedded."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path

from crosscoder.eval.inspection import PAD, Example

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td.text { text-align: left; }
.latent { margin: 1.5em 0; border-top: 1px solid #ddd; padding-top: .5em; }
.context { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; margin: 2px 0; }
.token { border-radius: 2px; } .center { outline: 1px solid #c00; }
img { max-width: 48%; margin-right: 1%; }
"""


def _highlight(example: Example, decode: Callable[[int], str]) -> str:
    peak = max(max(example.activations), 1e-12)
    pieces = []
    for index, (token, activation) in enumerate(zip(example.token_ids, example.activations, strict=True)):
        if token == PAD:
            continue
        alpha = max(0.0, activation) / peak
        classes = "token center" if index == example.center else "token"
        title = f"{activation:.3f}"
        pieces.append(
            f'<span class="{classes}" style="background: rgba(255,120,0,{alpha:.2f})" title="{title}">'
            f"{html.escape(decode(token))}</span>"
        )
    return f'<div class="context">{"".join(pieces)} <small>({example.activation:.3f})</small></div>'


def render_dashboard(
    path: Path,
    title: str,
    rows: list[dict[str, object]],
    examples: dict[int, list[Example]],
    decode: Callable[[int], str],
    images: list[Path] = (),
    summary: dict[str, object] | None = None,
) -> Path:
    """Write the dashboard. rows: one dict per latent (the table's columns, ``latent`` first); examples: top
    contexts per latent id; decode: token id → text; images: PNG files embedded as data URIs."""
    columns = list(rows[0]) if rows else ["latent"]
    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            text = f'<a href="#latent-{value}">{value}</a>' if column == "latent" else html.escape(text)
            cells.append(f'<td class="{"text" if isinstance(value, str) else ""}">{text}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    sections = []
    for row in rows:
        latent = row["latent"]
        contexts = "".join(_highlight(example, decode) for example in examples.get(int(latent), []))
        sections.append(
            f'<div class="latent" id="latent-{latent}"><h3>Latent {latent}</h3>{contexts or "<p>never fired</p>"}</div>'
        )
    pictures = "".join(
        f'<img alt="{html.escape(image.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(image.read_bytes()).decode()}">'
        for image in images
    )
    facts = "".join(
        f"<li><b>{html.escape(str(key))}</b>: {html.escape(str(value))}</li>" for key, value in (summary or {}).items()
    )
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1><ul>{facts}</ul><div>{pictures}</div>
<h2>Latents</h2><table id="latents"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>
<h2>Top-activating contexts</h2>{"".join(sections)}
</body></html>
"""
    path.write_text(document, encoding="utf-8")
    return path
