"""Loading dictionaries from local folders, the Hugging Face Hub (or its offline cache) and the
science-of-finetuning / ``dictionary_learning`` formats (docs/architecture.md §6).

Only safetensors and ``torch.load(weights_only=True)`` are used: nothing untrusted is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

from crosscoder.dictionary import (
    DICTIONARY_CLASSES,
    FORMAT_NAME,
    FORMAT_VERSION,
    BatchTopKCrossCoder,
    BatchTopKSAE,
    DedicatedCrossCoder,
    L1CrossCoder,
    SparseDictionary,
)
from crosscoder.dictionary_input import input_from_description
from crosscoder.errors import ConfigError, DictionaryFormatError, InputNotFoundError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def load_dictionary(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    map_location: str | torch.device = "cpu",
) -> SparseDictionary:
    """Load any dictionary: a folder written by ``save_pretrained``, a Hub repo id (offline from the HF
    cache when ``HF_HUB_OFFLINE=1``), or a science-of-finetuning / ``dictionary_learning`` checkpoint
    (a folder or repo with its ``config.json`` + ``model.safetensors``, or its ``checkpoint.pt``).

    The class is picked from the config. Weights that are NaN or infinite are refused.
    """
    path = Path(path_or_repo_id)
    if path.is_file() and (path.suffix == ".safetensors" or path.name == CONFIG_FILE):
        raise ConfigError(
            f"{path} is one file of a saved dictionary: pass the folder that holds it ({path.parent}) to "
            "load_dictionary"
        )
    if path.is_file():
        return _load_legacy_checkpoint(path, map_location)
    fetch = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    config_path = _resolve(path_or_repo_id, CONFIG_FILE, fetch)
    config = _read_config(config_path)
    weights_path = _resolve(path_or_repo_id, WEIGHTS_FILE, fetch)
    state_dict = _read_safetensors(weights_path, map_location)
    if config.get("format") == FORMAT_NAME:
        dictionary = dictionary_from_state(config, state_dict, source=str(path_or_repo_id))
    elif "dict_class" in config and "activation_dim" in config:
        dictionary = from_dictionary_learning(state_dict, config, source=str(weights_path))
    else:
        raise DictionaryFormatError(
            f"{config_path} is neither a crosscoder dictionary (no 'format': '{FORMAT_NAME}') nor a "
            "dictionary_learning one (no 'dict_class' and 'activation_dim'): point at a folder written by "
            "save_pretrained"
        )
    _check_finite(dictionary, weights_path)
    return dictionary


def _check_finite(dictionary: SparseDictionary, path: Path) -> None:
    """Refuse a dictionary whose weights or buffers hold NaN or Inf (a diverged run or a damaged file)."""
    broken = [name for name, tensor in dictionary.state_dict().items() if not torch.isfinite(tensor).all()]
    if broken:
        raise DictionaryFormatError(
            f"{path}: {', '.join(broken)} hold NaN or Inf values, so the dictionary cannot be used: the run that "
            "wrote it diverged or the file is damaged; load an earlier checkpoint or retrain"
        )


def can_be_hub_id(name: str) -> bool:
    """Whether ``name`` can name a Hub repository ('name' or 'owner/name'); if not, it can only be a local path
    (absolute, starting with '.' or '~', or with more than one '/')."""
    return name.count("/") <= 1 and not name.startswith((".", "/", "~"))


def _resolve(path_or_repo_id: str | Path, filename: str, fetch: dict[str, Any]) -> Path:
    """Local folder file, or the file downloaded from (or found in the cache of) the Hub."""
    local = Path(path_or_repo_id)
    if local.is_dir():
        if not (local / filename).is_file():
            raise InputNotFoundError(f"{local} has no {filename}: is it a folder written by save_pretrained?")
        return local / filename
    repo_id = str(path_or_repo_id)
    if not can_be_hub_id(repo_id):
        raise InputNotFoundError(f"{repo_id} is not a local folder, and not a Hub repo id ('owner/name') either")
    try:
        return Path(hf_hub_download(repo_id, filename, **fetch))
    except HFValidationError as error:
        raise InputNotFoundError(
            f"{repo_id} is not a local folder, and not a Hub repo id ('owner/name') either ({error})"
        ) from error
    except LocalEntryNotFoundError as error:
        raise InputNotFoundError(
            f"'{repo_id}' is neither a local folder nor in the Hugging Face cache, and the Hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1): download it where there is network (`hf download {repo_id}`) and copy "
            "the cache (HF_HOME) here, or pass a local folder"
        ) from error
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise InputNotFoundError(f"Hub repo '{repo_id}' has no {filename}: is it a dictionary repo?") from error


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DictionaryFormatError(f"{path} is not valid JSON ({error}): the file is corrupt or truncated") from error
    if not isinstance(config, dict):
        raise DictionaryFormatError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _read_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise DictionaryFormatError(
            f"{path} cannot be read as safetensors ({error}): the file is corrupt or truncated; save or "
            "download it again"
        ) from error


def dictionary_from_state(config: dict[str, Any], state_dict: dict[str, torch.Tensor], source: str) -> SparseDictionary:
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DictionaryFormatError(
            f"{source} was written in crosscoder format version {version!r}, but this crosscoder reads versions "
            f"up to {FORMAT_VERSION}: upgrade crosscoder (pip install -U crosscoder)"
        )
    class_name = config.get("dict_class")
    if class_name not in DICTIONARY_CLASSES:
        raise DictionaryFormatError(
            f"{source} holds an unknown dictionary class {class_name!r}; known: {sorted(DICTIONARY_CLASSES)}"
        )
    kwargs = {key: value for key, value in config.items() if key not in ("format", "format_version", "dict_class")}
    if version < 2 and class_name == "BatchTopKSAE":
        kwargs = _sae_kwargs_from_version_1(kwargs, source)
    try:
        dictionary = DICTIONARY_CLASSES[class_name](**kwargs)
    except (TypeError, ValueError) as error:
        raise DictionaryFormatError(f"{source}: config.json does not fit {class_name} ({error})") from error
    if version < 3 and isinstance(dictionary, DedicatedCrossCoder):
        state_dict = _dedicated_state_from_version_2(dictionary, state_dict, source)
    load_state_dict_checked(dictionary, state_dict, source)
    return dictionary.eval()


def _dedicated_state_from_version_2(
    dictionary: DedicatedCrossCoder, state_dict: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Format 2 stored a dedicated crosscoder's decoder dense (``W_dec``, structural zeros included); format 3 stores
    each model's rows (``W_dec_base``, ``W_dec_chat``). Split, after checking the blocks dropped are zero."""
    state_dict = dict(state_dict)
    dense = state_dict.pop("W_dec", None)
    if dense is None:
        return state_dict  # load_state_dict_checked names what is missing
    expected = (dictionary.dict_size, dictionary.n_sources, dictionary.d_model)
    if tuple(dense.shape) != expected:
        raise DictionaryFormatError(f"{source}: W_dec has shape {list(dense.shape)}, its config says {list(expected)}")
    nonzero = [
        f"latents {latents.start}:{latents.stop} × sources {sources.start or 0}:{sources.stop or dictionary.n_sources}"
        for latents, sources in dictionary.structural_zeros()
        if dense[latents, sources].any()
    ]
    if nonzero:
        raise DictionaryFormatError(
            f"{source}: a dedicated crosscoder's W_dec must be zero where an exclusive latent meets the other model, "
            f"but {', '.join(nonzero)} is not: the weights do not belong to this config.json"
        )
    state_dict["W_dec_base"], state_dict["W_dec_chat"] = dictionary.split_decoder(dense)
    return state_dict


def _sae_kwargs_from_version_1(kwargs: dict[str, Any], source: str) -> dict[str, Any]:
    """Format 1 described a BatchTopKSAE's input in free text (``input_description``: "chat - base"); format 2
    records it as ``input``. Read the text, or else the direction its training config recorded."""
    kwargs = dict(kwargs)
    description = kwargs.pop("input_description", "chat - base")
    try:
        kwargs["input"] = str(input_from_description(description))
    except ConfigError:
        direction = ((kwargs.get("metadata") or {}).get("train_config") or {}).get("diff_direction")
        if direction not in ("chat_minus_base", "base_minus_chat"):
            raise DictionaryFormatError(
                f"{source}: input_description {description!r} does not say whether the SAE reads chat − base or "
                "base − chat, and no training config records it: edit config.json to hold "
                '"input": "chat_minus_base" (or "base_minus_chat") and "format_version": 2'
            ) from None
        kwargs["input"] = direction
    return kwargs


def load_state_dict_checked(dictionary: SparseDictionary, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with an error that names missing, unexpected and mis-shaped tensors."""
    expected = dictionary.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{key} {list(state_dict[key].shape)} (config says {list(value.shape)})"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    if missing or unexpected or wrong_shape:
        raise DictionaryFormatError(
            f"{source}: weights do not match config.json (missing {missing}, unexpected {unexpected}, "
            f"wrong shape {wrong_shape}); the files come from different dictionaries or are corrupt"
        )
    dictionary.load_state_dict(state_dict)


# ---------------------------------------------------------------------------- dictionary_learning interop
def from_dictionary_learning(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any], source: str = "dictionary_learning checkpoint"
) -> SparseDictionary:
    """Convert a science-of-finetuning / ``dictionary_learning`` dictionary (docs/architecture.md §6; the
    normalisation mapping: docs/methods.md §1.2).

    Crosscoders: ``encoder.weight [L, d, F]``, ``encoder.bias [F]``, ``decoder.weight [L, F, d]``,
    ``decoder.bias [L, d]``; SAEs: ``encoder.weight [F, d]``, ``decoder.weight [d, F]``, ``b_dec [d]``.
    Optional normalisation buffers ``activation_mean`` / ``activation_std`` (NaN = off) and
    ``activation_global_scale`` map onto ``input_mean`` and ``input_scale``: the converted dictionary gives
    the same outputs on raw activations. ``source`` names the file in errors.
    """
    class_name = config.get("dict_class")
    metadata = {"converted_from": f"dictionary_learning {class_name}"}
    tensors = _CheckedTensors(state_dict, f"{source} (dictionary_learning {class_name})")
    try:
        if class_name in ("BatchTopKCrossCoder", "CrossCoder"):
            return _crosscoder_from_dictionary_learning(tensors, config, class_name, metadata)
        if class_name == "BatchTopKSAE":
            return _sae_from_dictionary_learning(tensors, metadata)
    except KeyError as error:
        raise DictionaryFormatError(
            f"{source}: dictionary_learning {class_name} checkpoint lacks the tensor {error}: it is truncated or not "
            f"a {class_name}"
        ) from error
    raise DictionaryFormatError(
        f"dictionary_learning class {class_name!r} is not supported; supported: BatchTopKCrossCoder, CrossCoder, "
        "BatchTopKSAE"
    )


class _CheckedTensors:
    """A dictionary_learning state dict whose tensors are checked against the shapes the conversion needs."""

    def __init__(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        self.state_dict, self.source = state_dict, source

    def get(self, name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
        """The tensor ``name`` (a missing one is a ``KeyError``), of ``shape`` (None: any size; () also takes a
        one-element tensor, returned as a scalar)."""
        tensor = self.state_dict[name]
        if shape == () and tensor.numel() == 1:
            return tensor.reshape(())
        fits = tensor.dim() == len(shape) and all(
            size in (None, actual) for size, actual in zip(shape, tensor.shape, strict=True)
        )
        if not fits:
            expected = ", ".join("*" if size is None else str(size) for size in shape)
            raise DictionaryFormatError(
                f"{self.source}: tensor '{name}' has shape {list(tensor.shape)}, but the other tensors need "
                f"[{expected}]: the file is damaged or its tensors come from different dictionaries"
            )
        return tensor


def _crosscoder_from_dictionary_learning(
    tensors: _CheckedTensors, config: dict[str, Any], class_name: str, metadata: dict[str, Any]
) -> SparseDictionary:
    mode = config.get("code_normalization", "CROSSCODER")
    if mode != "CROSSCODER":
        raise DictionaryFormatError(
            f"code_normalization={mode!r} is not supported: only CROSSCODER (c_j = Σ_s ‖W_dec[j, s]‖) is"
        )
    for option in ("encoder_layers", "num_decoder_layers", "latent_processor"):
        if config.get(option) is not None:
            raise DictionaryFormatError(f"dictionary_learning option {option}={config[option]!r} is not supported")
    encoder = tensors.get("encoder.weight", (None, None, None))  # [L, d, F]
    n_sources, d_model, dict_size = encoder.shape
    dictionary: SparseDictionary
    if class_name == "BatchTopKCrossCoder":
        dictionary = BatchTopKCrossCoder(d_model, dict_size, int(tensors.get("k", ())), n_sources, metadata=metadata)
        dictionary.threshold.copy_(tensors.get("threshold", ()))
    else:
        dictionary = L1CrossCoder(d_model, dict_size, n_sources, metadata=metadata)
    with torch.no_grad():
        dictionary.W_enc.copy_(encoder.permute(2, 0, 1))
        dictionary.b_enc.copy_(tensors.get("encoder.bias", (dict_size,)))
        dictionary.W_dec.copy_(tensors.get("decoder.weight", (n_sources, dict_size, d_model)).permute(1, 0, 2))
        dictionary.b_dec.copy_(tensors.get("decoder.bias", (n_sources, d_model)))
    _copy_normalisation(dictionary, tensors)
    return dictionary.eval()


def _sae_from_dictionary_learning(tensors: _CheckedTensors, metadata: dict[str, Any]) -> SparseDictionary:
    encoder = tensors.get("encoder.weight", (None, None))  # [F, d]
    dict_size, d_model = encoder.shape
    dictionary = BatchTopKSAE(d_model, dict_size, int(tensors.get("k", ())), metadata=metadata)
    with torch.no_grad():
        dictionary.W_enc.copy_(encoder[:, None, :])
        dictionary.b_enc.copy_(tensors.get("encoder.bias", (dict_size,)))
        dictionary.W_dec.copy_(tensors.get("decoder.weight", (d_model, dict_size)).T[:, None, :])
        dictionary.b_dec.copy_(tensors.get("b_dec", (d_model,))[None, :])
        dictionary.threshold.copy_(tensors.get("threshold", ()))
    _copy_normalisation(dictionary, tensors)
    return dictionary.eval()


@torch.no_grad()
def _copy_normalisation(dictionary: SparseDictionary, tensors: _CheckedTensors) -> None:
    """dictionary_learning normalises ``(x − mean) · global_scale`` when mean and std are both finite."""
    mean, std = tensors.state_dict.get("activation_mean"), tensors.state_dict.get("activation_std")
    if mean is None or std is None or mean.isnan().any() or std.isnan().any():
        return
    if isinstance(dictionary, BatchTopKSAE):  # one vector per token: mean [d], one scale
        mean, scale = tensors.get("activation_mean", (dictionary.d_model,)), tensors.get("activation_global_scale", ())
    else:
        mean = tensors.get("activation_mean", (dictionary.n_sources, dictionary.d_model))
        scale = tensors.get("activation_global_scale", (dictionary.n_sources,))
    dictionary.input_mean.copy_(mean.reshape(dictionary.input_mean.shape))
    dictionary.input_scale.copy_(scale.reshape(dictionary.input_scale.shape))


def _load_legacy_checkpoint(path: Path, map_location: str | torch.device) -> SparseDictionary:
    """A dictionary_learning ``checkpoint.pt`` (a ``torch.save``d state dict), with its ``config.json`` if present."""
    try:
        state_dict = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or hostile pickles
        raise DictionaryFormatError(
            f"{path} cannot be read as a weights-only torch checkpoint ({type(error).__name__}); it is corrupt, "
            "truncated, or holds objects other than tensors (which are never unpickled)"
        ) from error
    if not isinstance(state_dict, dict):
        raise DictionaryFormatError(f"{path} does not hold a state dict")
    config_path = path.with_name(CONFIG_FILE)
    config = _read_config(config_path) if config_path.is_file() else {}
    if "dict_class" not in config:
        config["dict_class"] = _guess_dictionary_learning_class(state_dict, path)
    dictionary = from_dictionary_learning(state_dict, config, source=str(path))
    _check_finite(dictionary, path)
    return dictionary


def _guess_dictionary_learning_class(state_dict: dict[str, Any], path: Path) -> str:
    if "b_dec" in state_dict:
        return "BatchTopKSAE"
    if "encoder.weight" in state_dict and state_dict["encoder.weight"].dim() == 3:
        return "BatchTopKCrossCoder" if "threshold" in state_dict else "CrossCoder"
    raise DictionaryFormatError(f"{path} is not a dictionary_learning crosscoder or BatchTopK SAE state dict")
