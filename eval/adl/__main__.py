"""``python -m crosscoder.eval.adl --base-model … --chat-model … --datasets … [--domain-data FILE] --out DIR``:
the Activation Difference Lens into a report folder (docs/methods.md §10.8)."""

from __future__ import annotations

import sys

import tyro

from crosscoder.errors import CrosscoderError, show_warnings_as_lines
from crosscoder.eval.adl.paths import LensPaths
from crosscoder.eval.adl.report import LensConfig, run_lens


def main(argv: list[str] | None = None) -> int:
    show_warnings_as_lines()
    config = tyro.cli(LensConfig, args=sys.argv[1:] if argv is None else argv, prog="python -m crosscoder.eval.adl")
    try:
        report = run_lens(config)
    except CrosscoderError as error:  # the user's to fix: one message; anything else keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    for layer, result in report["results"].items():
        for position, entry in result["positions"].items():
            lens = entry["logit_lens"]["delta"]["tokens"][:8]
            scope = entry["patchscope"]["delta"]
            print(
                f"layer {layer} position {position}: logit lens {lens}; Patchscope (scale {scope['scale']:g}) "
                f"{scope['tokens'][:8]}"
            )
    paths = LensPaths(config.out)
    print(f"report: {paths.report}, page: {paths.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
