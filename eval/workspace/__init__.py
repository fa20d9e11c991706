"""The latent workspace (docs/methods.md §11): an activation store of every latent, per-latent facts, readouts
through each model's unembedding, KL effects and steering, written as a static ``index.html``; SAELens export."""

from crosscoder.eval.directions import decoder_directions
from crosscoder.eval.workspace.build import (
    ModelAnalyses,
    checked_latents,
    chosen_latents,
    latent_columns,
    model_analyses,
)
from crosscoder.eval.workspace.collect import collect_store, dictionary_fingerprint
from crosscoder.eval.workspace.effects import carried_difference, kl_effects, removal_patches, steer_latent
from crosscoder.eval.workspace.pages import Column, WorkspaceContent, export_json, write_workspace
from crosscoder.eval.workspace.readout import Readout, unembedding_readout
from crosscoder.eval.workspace.saelens import export_saelens, saelens_weights
from crosscoder.eval.workspace.store import ActivationStore, StoreSettings, quantile_buckets, sample_priority

__all__ = [
    "ActivationStore",
    "Column",
    "ModelAnalyses",
    "Readout",
    "StoreSettings",
    "WorkspaceContent",
    "carried_difference",
    "checked_latents",
    "chosen_latents",
    "collect_store",
    "decoder_directions",
    "dictionary_fingerprint",
    "export_json",
    "export_saelens",
    "kl_effects",
    "latent_columns",
    "model_analyses",
    "quantile_buckets",
    "removal_patches",
    "saelens_weights",
    "sample_priority",
    "steer_latent",
    "unembedding_readout",
    "write_workspace",
]
