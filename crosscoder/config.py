"""The one training configuration: CLI flags, checkpoints and saved dictionaries all derive from it.

One concept in one module (~520 lines): every field with its documentation (the CLI's ``--help``), the one rule
that validates each, the fields a resume may change, and the named presets.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from crosscoder.errors import ConfigError

Architecture = Literal["batchtopk", "l1", "diff_sae", "matryoshka", "matryoshka_diff_sae", "dedicated"]
Parallelism = Literal["auto", "data", "latents"]

#: Saved-dictionary name of each architecture (a run folder holds one subfolder per dictionary).
DICTIONARY_NAMES: dict[str, str] = {
    "batchtopk": "batchtopk_crosscoder",
    "l1": "l1_crosscoder",
    "diff_sae": "diff_sae",
    "matryoshka": "matryoshka_crosscoder",
    "matryoshka_diff_sae": "matryoshka_diff_sae",
    "dedicated": "dedicated_crosscoder",
}

#: The architectures whose encoder may read x̃ − b_dec (``centered_encoder``); the SAEs always do, L1 never.
CENTERABLE: tuple[Architecture, ...] = ("batchtopk", "matryoshka", "dedicated")
#: The architectures latent sharding can split (the others' prefixes or partitions span the latent index).
LATENT_SHARDABLE: tuple[str, ...] = ("batchtopk", "diff_sae")


@dataclass(frozen=True)
class TrainConfig:
    """Train sparse dictionaries (crosscoders, difference SAEs) on paired base/chat activations."""

    # ---------------------------------------------------------------- what to train
    architectures: tuple[Architecture, ...] = ("batchtopk",)
    """Dictionaries trained side by side on the same batches: batchtopk (BatchTopK crosscoder), l1 (L1
    crosscoder), diff_sae (BatchTopK SAE on chat − base), matryoshka and matryoshka_diff_sae (the same two trained on
    nested prefixes, --matryoshka-prefixes), dedicated (BatchTopK crosscoder with base-only and chat-only latents,
    --exclusive-fractions)."""
    expansion_factor: int = 32
    """Latents per activation dimension: dict_size = expansion_factor · d_model (unless dict_size is set)."""
    dict_size: int | None = None
    """Number of latents; overrides expansion_factor."""
    k: int = 100
    """BatchTopK: average active latents per token (the batch keeps k · batch_size entries)."""
    k_max: int | None = None
    """k-annealing: start at k_max and decrease linearly to k over k_anneal_steps (None = no annealing)."""
    k_anneal_steps: int = 0
    """Steps over which k anneals from k_max to k."""
    init_decoder_norm: float | None = None
    """Initial per-latent per-source decoder norm (None: 1.0 for BatchTopK, 0.05 for L1)."""
    diff_direction: Literal["chat_minus_base", "base_minus_chat"] = "chat_minus_base"
    """Input of the difference SAE (source 0 = base, 1 = chat)."""
    source_names: tuple[str, ...] | None = None
    """Names of the sources in order (recorded in the dictionaries' configs); default: base, chat."""
    matryoshka_prefixes: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0)
    """Matryoshka dictionaries: nested prefixes of the latents as fractions of dict_size (increasing, ending at 1);
    the loss averages the reconstruction losses of the selected latents below each prefix."""
    exclusive_fractions: tuple[float, float] = (0.1, 0.1)
    """Dedicated crosscoder: fractions of the latents exclusive to the base and to the chat model (their decoders
    for the other model are fixed at zero); the rest are shared."""
    exclusive_k: tuple[int, int] | None = None
    """Dedicated crosscoder: per-token BatchTopK budgets BASE CHAT of the base-only and chat-only latents, each at
    least 1 and at most its partition's latent count (0 for an empty partition); the shared latents get k − BASE − CHAT.
    Each partition keeps its own k_p · batch_size largest scores and has its own inference threshold; k-annealing
    scales the budgets with k (docs/methods.md §12.2). None: all partitions share one budget k."""
    exclusive_encoder: Literal["own", "both"] = "own"
    """Dedicated crosscoder: an exclusive latent's encoder reads its own model only (own) or both models (both)."""
    centered_encoder: bool = False
    """BatchTopK crosscoders (plain, Matryoshka, dedicated): the encoder reads x̃ − b_dec, as the SAE's does, instead
    of x̃ as the reference crosscoders' do (off, for their behaviour). The demo turns it on: on the organism it
    halved the latents that never fire (docs/methods.md §2.5)."""

    # ---------------------------------------------------------------- data: where batches come from (name one)
    base_model: str | None = None
    """Base model (Hub id or local folder); with chat_model, activations are streamed from both."""
    chat_model: str | None = None
    """Chat/finetuned model (Hub id or local folder); its tokenizer and chat template are used."""
    base_revision: str | None = None
    """Hub revision of the base model."""
    chat_revision: str | None = None
    """Hub revision of the chat model."""
    cache: Path | None = None
    """Read batches from an on-disk activation cache (built with `python -m crosscoder.cache build`)."""
    allow_incomplete_cache: bool = False
    """Train on a cache whose build has not finished (its finished shards); without it such a cache is refused."""
    activations: Path | None = None
    """Tensor file of paired activations [tokens, n_sources, d_model] (.safetensors key 'activations', or .pt)."""
    model_organism: bool = False
    """Stream from the offline model organism (a tiny base LM and a copy finetuned on baking chats, built and
    cached on first use), at its recommended layer unless --layers is given; its chat markers are dropped. The
    command line fills in its models and data (``crosscoder.organism_source.resolve_model_organism``)."""
    synthetic: bool = False
    """Train on activations generated from a planted sparse dictionary (a self-check of the pipeline)."""

    # ---------------------------------------------------------------- streaming
    layers: Annotated[tuple[int, ...] | None, tyro.conf.arg(aliases=("--layer",))] = None
    """Layer(s) L: the residual stream output of block L (= hidden_states[L + 1]); None = the middle block.
    Several layers give n_sources = 2 · len(layers) (base layers, then chat layers)."""
    model_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """dtype the models run in (activations arrive in it)."""
    base_dtype: Literal["bfloat16", "float32", "float16"] | None = None
    """dtype of the base model (None = model_dtype)."""
    chat_dtype: Literal["bfloat16", "float32", "float16"] | None = None
    """dtype of the chat model (None = model_dtype)."""
    base_device: str | None = None
    """Device of the base model (None = device)."""
    chat_device: str | None = None
    """Device of the chat model (None = device)."""
    trust_remote_code: bool = False
    """Allow model code from the Hub (off unless you trust the repository)."""
    datasets: tuple[str, ...] = ()
    """Text sources: Hub dataset ids or local .jsonl/.json/.parquet/.csv/.txt files."""
    dataset_weights: tuple[float, ...] | None = None
    """Mixture weights, one per dataset (None = equal)."""
    dataset_split: str = "train"
    """Split of Hub datasets."""
    dataset_streaming: bool = True
    """Stream datasets instead of downloading them whole (local files are read the same way)."""
    text_column: str = "text"
    """Column holding plain text."""
    messages_column: str = "messages"
    """Column holding chat conversations (a list of {role, content}), rendered with the chat template."""
    context_length: int = 1024
    """Tokens per sequence (longer documents are truncated)."""
    block_sequences: int = 256
    """Sequences per shuffle block: a block's tokens are shuffled together before batching."""
    model_batch_size: int = 16
    """Sequences per model forward."""
    drop_first_tokens: int = 1
    """Drop the first n tokens of each sequence (the BOS token and attention-sink positions)."""
    drop_token_ids: tuple[int, ...] = ()
    """Drop tokens with these ids (e.g. chat-template special tokens)."""
    outlier_norm_factor: float = 100.0
    """Drop tokens whose activation norm exceeds this multiple of the block median in either model (0 = off)."""
    prefetch_blocks: int = 1
    """Blocks computed ahead in a background thread while the dictionaries train (0 = no prefetch)."""
    batch_size: int = 4096
    """Tokens per training batch."""
    num_tokens: int = 100_000_000
    """Training length in tokens (steps = num_tokens // batch_size)."""
    normalization_tokens: int = 100_000
    """Tokens used to estimate the per-source input scale E‖scale · x‖ = √d_model."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Decoder bias initialisation from the first (normalised) batch."""

    # ---------------------------------------------------------------- optimisation
    lr: float = 1e-4
    """Adam learning rate (β = 0.9, 0.999)."""
    warmup_steps: int = 1000
    """Linear learning-rate warm-up steps."""
    decay_fraction: float = 0.0
    """Decay the learning rate linearly to 0 over this final fraction of training (0 = constant)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (per dictionary)."""
    loss: Literal["mse", "l2"] = "mse"
    """Reconstruction loss: mse (squared error summed over sources and d, mean over batch) or l2 (unsquared
    norm, mean over batch and sources)."""
    l1_coefficient: float = 4.1e-2
    """L1 crosscoder sparsity coefficient λ in λ · mean_b Σ_j f_j c_j."""
    l1_warmup_steps: int = 0
    """Steps over which λ ramps linearly from 0."""
    aux_k: int | None = None
    """AuxK: dead latents decoded per token (None = d_model // 2; 0 disables AuxK)."""
    aux_coefficient: float = 1 / 32
    """AuxK loss coefficient."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many tokens without firing."""
    threshold_start_step: int = 1000
    """Step from which the inference threshold θ is estimated."""
    threshold_beta: float = 0.999
    """EMA factor of θ (smallest kept score per batch)."""

    parallelism: Parallelism = "auto"
    """Under torchrun (each process always reads its own share of every global batch): ``data`` trains whole
    dictionaries on the shares and all-reduces the gradients (O(dict_size · d) per step); ``latents`` all-gathers the
    shares and gives each process ``dict_size / N`` of the latents (O(batch_size · d) per step, and 1/N of the
    dictionary state per device); ``auto`` picks ``latents`` when dict_size ≥ batch_size, the latents split evenly
    and no dictionary is an L1 crosscoder, else ``data``."""

    shard_optimizer: Literal["auto", "yes", "no"] = "auto"
    """Under ``--parallelism data``: shard Adam over the processes (each holds the moments of, and updates, 1/N of
    the parameters; the gradients reduce-scattered, the updates all-gathered; docs/architecture.md §7), or all-reduce
    the gradients and update everything on every process (``no``). ``auto`` shards on NCCL, where a reduce-scatter
    and an all-gather move the bytes of one all-reduce, and on gloo when every process runs on one host, where the
    two go through shared memory (``crosscoder.training.shared_memory_exchange``); not on gloo across hosts, whose
    reduce-scatter and all-gather took 3.1× its all-reduce on this project's CPU machine (bench/scaling.py)."""

    # ---------------------------------------------------------------- run
    seed: int = 0
    """Seed of initialisation and data order."""
    device: str = "auto"
    """Torch device (auto = cuda when available)."""
    output_dir: Path = Path("runs")
    """Folder of runs; a run writes output_dir/run_name/{checkpoints,<dictionary>}."""
    run_name: str = "run"
    """Name of this run's folder (and wandb run)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are deleted after a newer one is written)."""
    resume: bool = False
    """Continue from the latest checkpoint of output_dir/run_name."""
    log_every: int = 50
    """Steps between logged metrics (and the finiteness check)."""
    validation_tokens: int = 0
    """Tokens of the training data source read again in another order (seed + 1) to validate every dictionary with
    its inference threshold at the end (and every ``validate_every`` steps): the saved metrics then mean what
    evaluation measures. Held out only where the source is larger than the run (streamed datasets, synthetic data);
    a cache or a tensor file is re-read. 0 = no validation unless ``train`` is given validation batches."""
    validate_every: int = 0
    """Steps between validation passes when there is validation data (0 = only at the end)."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (None = no wandb)."""
    wandb_mode: Literal["online", "offline"] = "online"
    """wandb mode; offline writes the run locally for a later `wandb sync`."""
    push_to_hub: str | None = None
    """Push the final dictionaries to this Hub repo id (several dictionaries: REPO-<name>)."""
    progress: bool = True
    """Show progress bars."""
    preset: str | None = None
    """Preset the config started from (recorded; select presets with --preset NAME on the CLI)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Human-readable reasons this config cannot run (empty when valid); each names the flag to fix."""
        problems = [problem for name, rule in _NUMERIC_RULES.items() if (problem := rule.problem(name, self))]
        if not self.architectures:
            problems.append("architectures is empty: name at least one of batchtopk, l1, diff_sae")
        if len(set(self.architectures)) != len(self.architectures):
            problems.append(f"architectures {self.architectures} lists one twice")
        if self.dict_size is not None and self.dict_size <= self.k:
            problems.append(f"--k ({self.k}) must be smaller than --dict-size ({self.dict_size})")
        if self.k_max is not None:
            if self.k_max < self.k:
                problems.append(f"--k-max ({self.k_max}) must be at least --k ({self.k})")
            if self.dict_size is not None and self.k_max > self.dict_size:
                problems.append(f"--k-max ({self.k_max}) must be at most --dict-size ({self.dict_size})")
            if self.k_anneal_steps <= 0:
                problems.append(
                    f"--k-max ({self.k_max}) anneals over --k-anneal-steps, which must then be > 0, got "
                    f"{self.k_anneal_steps}"
                )
        if self.num_tokens < self.batch_size:
            problems.append(f"--num-tokens ({self.num_tokens}) is less than one batch (--batch-size {self.batch_size})")
        for name in ("layers", "drop_token_ids"):
            negative = [value for value in getattr(self, name) or () if value < 0]
            if negative:
                problems.append(f"{_flag(name)} must be ≥ 0, got {negative}")
        if self.dataset_weights is not None:
            if len(self.dataset_weights) != len(self.datasets):
                problems.append(f"{len(self.dataset_weights)} dataset weights for {len(self.datasets)} datasets")
            if not all(math.isfinite(weight) and weight >= 0 for weight in self.dataset_weights) or not any(
                self.dataset_weights
            ):
                problems.append(
                    f"--dataset-weights must be finite and ≥ 0, not all 0, got {list(self.dataset_weights)}"
                )
        named = [
            name
            for name, on in (
                # a resolved organism config names its models too (crosscoder.organism_source.resolve_model_organism)
                ("--base-model/--chat-model", bool(self.base_model or self.chat_model) and not self.model_organism),
                ("--cache", self.cache is not None),
                ("--activations", self.activations is not None),
                ("--model-organism", self.model_organism),
                ("--synthetic", self.synthetic),
            )
            if on
        ]
        if len(named) > 1:
            problems.append(f"name one data source, not {' and '.join(named)}")
        if bool(self.base_model) != bool(self.chat_model):
            problems.append("--base-model and --chat-model go together")
        unshardable = [name for name in self.architectures if name not in LATENT_SHARDABLE]
        if self.parallelism == "latents" and unshardable:
            problems.append(
                f"parallelism='latents' supports the BatchTopK dictionaries (batchtopk, diff_sae), not "
                f"{', '.join(unshardable)} (L1 codes are not selected globally; Matryoshka prefixes and dedicated "
                "partitions span the latent index): use --parallelism data"
            )
        prefixes = self.matryoshka_prefixes
        if (
            not prefixes
            or prefixes[-1] != 1
            or not all(small < large for small, large in itertools.pairwise((0, *prefixes)))
        ):
            problems.append(
                f"--matryoshka-prefixes must be increasing fractions of dict_size in (0, 1] ending at 1, got "
                f"{list(prefixes)}"
            )
        if self.centered_encoder and not set(self.architectures) & set(CENTERABLE):
            problems.append(
                f"--centered-encoder applies to {', '.join(CENTERABLE)} crosscoders, but the run trains "
                f"{', '.join(self.architectures)}: add one of them or drop the flag"
            )
        if len(self.exclusive_fractions) != 2 or not (
            all(0 <= fraction < 1 for fraction in self.exclusive_fractions) and sum(self.exclusive_fractions) < 1
        ):
            problems.append(
                f"--exclusive-fractions takes two fractions ≥ 0 (base-only, chat-only) summing to less than 1 (the "
                f"rest are shared), got {list(self.exclusive_fractions)}"
            )
        if self.exclusive_k is not None:
            if "dedicated" not in self.architectures:
                problems.append(
                    f"--exclusive-k applies to the dedicated crosscoder, but the run trains "
                    f"{', '.join(self.architectures)}: add dedicated to --architectures or drop the flag"
                )
            if len(self.exclusive_k) != 2 or min(self.exclusive_k) < 0 or sum(self.exclusive_k) >= self.k:
                problems.append(
                    f"--exclusive-k takes two per-token budgets ≥ 0 (base-only, chat-only) summing to less than --k "
                    f"({self.k}), the rest going to the shared latents, got {list(self.exclusive_k)}"
                )
        return problems

    def threshold_window_problem(self) -> str | None:
        """Why the inference threshold θ (an EMA, docs/methods.md §1.6) would not settle on the final weights: fewer
        than ``3 / (1 − threshold_beta)`` steps after ``threshold_start_step`` leave more than ~5 % of its weight on
        early, stale estimates (θ then sits above the final batch thresholds and silences rare latents)."""
        if all(architecture == "l1" for architecture in self.architectures):
            return None
        steps = self.total_steps - self.threshold_start_step
        if steps <= 0:
            return (
                f"the run ends at step {self.total_steps}, before threshold_start_step={self.threshold_start_step}: θ "
                "is never estimated, so the saved dictionary keeps every positive activation at inference (no "
                f"sparsity); set threshold_start_step below {self.total_steps} or train longer"
            )
        if steps * (1 - self.threshold_beta) >= 3 - 1e-9:
            return None
        return (
            f"threshold_beta={self.threshold_beta} averages θ over ~{round(1 / (1 - self.threshold_beta))} steps but "
            f"only {steps} steps follow threshold_start_step={self.threshold_start_step}: θ will keep "
            f"{self.threshold_beta**steps:.0%} of its first estimate and lag the final weights; set "
            f"threshold_beta ≤ {1 - 3 / max(steps, 3):.4g} or train longer"
        )

    def check_output_dir(self) -> None:
        """Refuse, before any compute, an ``output_dir`` that cannot hold this run's folder: a file in the way, or a
        folder that cannot be created or written. Creates ``output_dir``."""
        problem = output_folder_problem(Path(self.output_dir))
        if problem is None and self.run_dir.exists() and not self.run_dir.is_dir():
            problem = f"{self.run_dir} is a file"
        if problem is not None:
            raise ConfigError(
                f"--output-dir {self.output_dir} cannot hold the run folder {self.run_name}: {problem}; pass a "
                "writable folder with --output-dir (or another --run-name)"
            )

    @property
    def total_steps(self) -> int:
        return self.num_tokens // self.batch_size

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        """JSON- and checkpoint-safe dict (paths as strings, tuples as lists)."""
        return {key: _plain(value) for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict`` (older releases' fields migrated); unknown keys are an error naming them."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        converted = migrate_config_dict(values)
        unknown = sorted(set(converted) - set(fields))
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields {unknown}: the config comes from a newer version")
        for name in ("output_dir", "activations", "cache"):
            if converted.get(name) is not None:
                converted[name] = Path(converted[name])
        for name in (
            "architectures",
            "source_names",
            "layers",
            "datasets",
            "dataset_weights",
            "drop_token_ids",
            "matryoshka_prefixes",
            "exclusive_fractions",
            "exclusive_k",
        ):
            if converted.get(name) is not None:
                converted[name] = tuple(converted[name])
        return cls(**converted)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class _Range:
    """The valid values of a numeric field: between ``low`` and ``high`` (``closed``: whether each end is valid),
    and finite; an unset (None) optional field passes."""

    low: float
    high: float = math.inf
    closed: tuple[bool, bool] = (False, False)

    def problem(self, name: str, config: TrainConfig) -> str | None:
        value = getattr(config, name)
        if value is None:
            return None
        above = value >= self.low if self.closed[0] else value > self.low
        below = value <= self.high if self.closed[1] else value < self.high
        if math.isfinite(value) and above and below:
            return None
        if self.high == math.inf:
            valid = f"{'≥' if self.closed[0] else '>'} {self.low:g}"
        else:
            valid = f"in {'[' if self.closed[0] else '('}{self.low:g}, {self.high:g}{']' if self.closed[1] else ')'}"
        return f"{_flag(name)} must be {'finite and ' if isinstance(value, float) else ''}{valid}, got {value!r}"


_POSITIVE = _Range(0)
_NON_NEGATIVE = _Range(0, closed=(True, False))

#: The valid range of every numeric field (k_max, which depends on k and dict_size, is checked in ``problems``).
_NUMERIC_RULES: dict[str, _Range] = {
    "expansion_factor": _POSITIVE,
    "dict_size": _POSITIVE,
    "k": _POSITIVE,
    "k_anneal_steps": _NON_NEGATIVE,
    "init_decoder_norm": _POSITIVE,
    "context_length": _Range(2, closed=(True, False)),
    "block_sequences": _POSITIVE,
    "model_batch_size": _POSITIVE,
    "drop_first_tokens": _NON_NEGATIVE,
    "outlier_norm_factor": _NON_NEGATIVE,
    "prefetch_blocks": _NON_NEGATIVE,
    "batch_size": _POSITIVE,
    "num_tokens": _POSITIVE,
    "normalization_tokens": _POSITIVE,
    "lr": _POSITIVE,
    "warmup_steps": _NON_NEGATIVE,
    "decay_fraction": _Range(0, 1, closed=(True, True)),
    "grad_clip": _POSITIVE,
    "l1_coefficient": _NON_NEGATIVE,
    "l1_warmup_steps": _NON_NEGATIVE,
    "aux_k": _NON_NEGATIVE,
    "aux_coefficient": _NON_NEGATIVE,
    "dead_tokens": _POSITIVE,
    "threshold_start_step": _NON_NEGATIVE,
    "threshold_beta": _Range(0, 1),
    "seed": _NON_NEGATIVE,
    "checkpoint_every": _NON_NEGATIVE,
    "keep_checkpoints": _Range(1, closed=(True, False)),
    "log_every": _POSITIVE,
    "validate_every": _NON_NEGATIVE,
    "validation_tokens": _NON_NEGATIVE,
}


def output_folder_problem(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (None when they can); creates it, with its parents, when missing."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"{folder} cannot be created or written ({error.strerror or type(error).__name__})"
    return None


def migrate_config_dict(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict written by an earlier release, in today's fields: ``shard_latents`` (bool) became
    ``parallelism`` (``latents`` when it was true, else ``auto``)."""
    migrated = dict(values)
    if "shard_latents" in migrated:
        migrated.setdefault("parallelism", "latents" if migrated.pop("shard_latents") else "auto")
    return migrated


def config_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Names of the fields in which a saved config dict (any release) differs from ``config``; a field the saved
    dict lacks (added since) counts at its default, a field today's config lacks counts as different."""
    saved = migrate_config_dict(saved)
    current, defaults = config.to_dict(), {f.name: _plain(f.default) for f in dataclasses.fields(TrainConfig)}
    differing = [name for name, value in current.items() if saved.get(name, defaults[name]) != value]
    return sorted(differing + [name for name in saved if name not in current])


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


#: Fields that may differ between a run and its resumption (they do not change what is trained).
RUN_CONTROL_FIELDS = frozenset(
    {
        "resume",
        "log_every",
        "validate_every",
        "validation_tokens",
        "checkpoint_every",
        "keep_checkpoints",
        "wandb_project",
        "wandb_mode",
        "push_to_hub",
        "progress",
        "device",
        "activations",
        "output_dir",
        "cache",
        "allow_incomplete_cache",
        "base_device",
        "chat_device",
        "prefetch_blocks",
        "parallelism",  # both modes read the same shares and write consolidated checkpoints
        "shard_optimizer",  # checkpoints hold Adam's state in one process's layout either way
    }
)

PRESETS: dict[str, tuple[str, TrainConfig]] = {
    "demo": (
        "The offline default run: diff the model organism (a tiny base LM and its baking-finetuned chat copy) with "
        "a BatchTopK crosscoder and a diff-SAE (a few minutes on 2 CPU cores)",
        TrainConfig(
            model_organism=True,
            architectures=("batchtopk", "diff_sae"),
            k=8,
            dict_size=512,  # at 1,024 (and lr 1e-3) a third of the crosscoder's latents died (docs/methods.md §2.3)
            batch_size=1024,
            num_tokens=1024 * 1500,
            lr=2e-4,
            warmup_steps=100,
            threshold_start_step=300,
            threshold_beta=0.99,  # θ settles within the 1,200 steps after threshold_start_step
            dead_tokens=300_000,
            aux_coefficient=1.0,
            centered_encoder=True,
            validation_tokens=200_000,  # as many as `python -m crosscoder.eval` reads by default
            normalization_tokens=16_384,
            model_dtype="float32",
            context_length=256,
            block_sequences=64,
            dataset_streaming=False,
            checkpoint_every=500,
            log_every=50,
            preset="demo",
            run_name="demo",
        ),
    ),
    "synthetic": (
        "Self-check on planted data: a BatchTopK crosscoder and a diff-SAE trained on activations generated from a "
        "known sparse dictionary, then reports the share of planted latents each recovered (about 80 s on 2 CPU "
        "cores)",
        TrainConfig(
            synthetic=True,
            architectures=("batchtopk", "diff_sae"),
            k=4,
            dict_size=128,
            batch_size=512,
            num_tokens=512 * 8000,  # the diff-SAE's 64 planted directions in 32 dimensions need the steps
            lr=3e-3,
            validation_tokens=16_384,
            warmup_steps=50,
            threshold_start_step=200,
            dead_tokens=100_000,
            normalization_tokens=4096,
            checkpoint_every=500,
            log_every=100,
            preset="synthetic",
            run_name="synthetic",
        ),
    ),
    "paper-batchtopk": (
        "BatchTopK crosscoder of Minder et al. (Gemma-2-2B vs -it, L13): k=100, 32x expansion, l2 loss, lr 1e-4",
        TrainConfig(
            architectures=("batchtopk",),
            k=100,
            expansion_factor=32,
            loss="l2",
            lr=1e-4,
            batch_size=2048,
            num_tokens=100_000_000,
            warmup_steps=1000,
            threshold_start_step=1000,
            preset="paper-batchtopk",
            run_name="paper-batchtopk",
        ),
    ),
    "paper-l1": (
        "L1 crosscoder of Minder et al.: λ=4.1e-2, 32x expansion, lr 1e-4, decoder init norm 0.05",
        TrainConfig(
            architectures=("l1",),
            expansion_factor=32,
            l1_coefficient=4.1e-2,
            lr=1e-4,
            batch_size=2048,
            num_tokens=100_000_000,
            init_decoder_norm=0.05,
            l1_warmup_steps=5000,
            preset="paper-l1",
            run_name="paper-l1",
        ),
    ),
    "paper-diff-sae": (
        "Difference SAE (BatchTopK SAE on chat − base activations): k=100, 32x expansion, lr 1e-4",
        TrainConfig(
            architectures=("diff_sae",),
            k=100,
            expansion_factor=32,
            lr=1e-4,
            batch_size=2048,
            num_tokens=100_000_000,
            preset="paper-diff-sae",
            run_name="paper-diff-sae",
        ),
    ),
}


def preset(name: str) -> TrainConfig:
    """The config of a named preset; an unknown name is an error listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name][1]
