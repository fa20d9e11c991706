"""The Activation Difference Lens (docs/methods.md §10): what a finetune changed, read from the mean difference
of the two models' activations on the first tokens of unrelated text.

>>> from crosscoder.eval import adl
>>> means = adl.mean_differences(base, chat, tokenizer, texts)          # δ, base and chat means, norms
>>> adl.chat_mean_differences(base, chat, tokenizer, conversations)    # around the assistant turn, positions −3 …
>>> adl.logit_lens(means.vector("delta", layer, 0), chat, tokenizer)    # tokens + probs (and the inverse)
>>> adl.patchscope(vector, chat, tokenizer, layer, norm=means.norms["chat"][layer])
>>> adl.steer(chat, tokenizer, vector, layer, strength, prompts, norm=means.norms["chat"][layer])

``python -m crosscoder.eval.adl --base-model … --chat-model … --datasets … --out DIR`` runs everything into a
report folder whose files ``LensPaths`` names; ``overview`` and the ``*_details`` functions read it.
"""

from crosscoder.eval.adl.causal import causal_effect, random_activation_differences, random_directions
from crosscoder.eval.adl.differences import (
    VECTORS,
    MeanDifferences,
    chat_mean_differences,
    check_pair,
    default_layer,
    mean_differences,
    resolve_layers,
)
from crosscoder.eval.adl.graders import Grader, LLMGrader, OfflineGrader
from crosscoder.eval.adl.lens import final_norm, lens_logits, logit_lens, unembedding
from crosscoder.eval.adl.patchscope import DEFAULT_SCALES, IDENTITY_PROMPTS, patched_distributions, patchscope
from crosscoder.eval.adl.paths import LensPaths
from crosscoder.eval.adl.relevance import frequent_tokens, is_generic, llm_relevance, relevance, stopwords
from crosscoder.eval.adl.report import LensConfig, run_lens
from crosscoder.eval.adl.steering import (
    Generation,
    LossCoherence,
    bag_of_tokens,
    cosine,
    find_strength,
    generate,
    search_strength,
    steer,
    steering_prompts,
)
from crosscoder.eval.adl.views import (
    causal_effect_details,
    load_report,
    logit_lens_details,
    overview,
    patchscope_details,
    steering_details,
)

__all__ = [
    "DEFAULT_SCALES",
    "IDENTITY_PROMPTS",
    "VECTORS",
    "Generation",
    "Grader",
    "LLMGrader",
    "LensConfig",
    "LensPaths",
    "LossCoherence",
    "MeanDifferences",
    "OfflineGrader",
    "bag_of_tokens",
    "causal_effect",
    "causal_effect_details",
    "chat_mean_differences",
    "check_pair",
    "cosine",
    "default_layer",
    "final_norm",
    "find_strength",
    "frequent_tokens",
    "generate",
    "is_generic",
    "lens_logits",
    "llm_relevance",
    "load_report",
    "logit_lens",
    "logit_lens_details",
    "mean_differences",
    "overview",
    "patched_distributions",
    "patchscope",
    "patchscope_details",
    "random_activation_differences",
    "random_directions",
    "relevance",
    "resolve_layers",
    "run_lens",
    "search_strength",
    "steer",
    "steering_details",
    "steering_prompts",
    "stopwords",
    "unembedding",
]
