"""``python -m crosscoder.eval DICTIONARY --out DIR``: evaluate a dictionary into a report folder and its latent
workspace (``DIR/index.html``, docs/methods.md §11)."""

from __future__ import annotations

import sys

import tyro

from crosscoder.errors import CrosscoderError, show_warnings_as_lines
from crosscoder.eval.report import EvalConfig, evaluate


def main(argv: list[str] | None = None) -> int:
    show_warnings_as_lines()
    config = tyro.cli(EvalConfig, args=sys.argv[1:] if argv is None else argv, prog="python -m crosscoder.eval")
    try:
        report = evaluate(config)
    except CrosscoderError as error:  # the user's to fix: one message; anything else keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    recon = report.get("reconstruction")
    if recon is not None:
        print(f"FVE {recon['fve']:.4f}, L0 {recon['l0']:.2f}, dead {recon['dead_fraction']:.3f}")
    if "exclusivity" in report:
        print(f"latent classes: {report['exclusivity']['counts']}")
    if "latent_scaling" in report:
        scaling = report["latent_scaling"]
        print(
            f"genuine (Latent Scaling): {scaling['genuine_chat_latents']} of {scaling['analysed_chat_latents']} "
            f"{report['exclusivity']['analysed']} latents"
        )
    if isinstance(report.get("downstream_kl"), dict):
        print(f"downstream KL gap closed: {report['downstream_kl']['gap_closed']}")
    print(f"report: {config.out / 'report.json'}, workspace: {config.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
