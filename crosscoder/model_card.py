"""The model card written beside a saved dictionary (``README.md``): configuration, training metrics, provenance
and a usage snippet, filled into ``MODEL_CARD_TEMPLATE`` by the Hub mixin."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crosscoder.dictionary import SparseDictionary

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

Trained with `crosscoder`, a model-diffing toolkit (pip package `crosscoder`).

## Configuration

| field | value |
|---|---|
{{ config_table }}

## Training metrics

{{ metrics }}

## Usage

```python
import crosscoder

dictionary = crosscoder.load_dictionary("{{ repo_id }}")
{{ usage }}
```

Inputs and outputs are raw model activations: the dictionary applies its stored normalisation itself.
"""


def model_card_fields(dictionary: SparseDictionary, repo_id: str) -> dict[str, str]:
    """The values the template is filled with: title, description, config table, metrics, usage snippet."""
    hidden = ("format", "format_version", "dict_class", "metadata")
    fields = {key: value for key, value in dictionary.config().items() if key not in hidden}
    rows = [f"| `{key}` | `{value}` |" for key, value in fields.items()]
    rows.append(f"| `class` | `{type(dictionary).__name__}` |")
    metrics = dictionary.metadata.get("metrics")
    metric_text = (
        "\n".join(f"- **{name}**: {_format_number(value)}" for name, value in metrics.items())
        if isinstance(metrics, dict) and metrics
        else "No metrics recorded."
    )
    extra = {key: value for key, value in dictionary.metadata.items() if key not in ("metrics", "provenance")}
    provenance = dictionary.metadata.get("provenance")
    if isinstance(provenance, dict):  # the record itself stays in config.json; the card names the essentials
        recorded = provenance.get("activations", {})
        extra["data"] = provenance.get("data_source")
        for key in ("base_model", "chat_model", "layers", "datasets"):
            if recorded.get(key):
                extra[key] = recorded[key]
    description = dictionary.describe()
    if extra:
        description += "\n\n" + "\n".join(f"- {key}: `{value}`" for key, value in extra.items())
    return {
        "title": f"{type(dictionary).__name__} ({dictionary.dict_size} latents, d_model={dictionary.d_model})",
        "description": description,
        "config_table": "\n".join(rows),
        "metrics": metric_text,
        "repo_id": repo_id,
        "usage": dictionary.usage_snippet(),
    }


def _format_number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
