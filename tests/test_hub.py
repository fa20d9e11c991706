"""Specification of saving and loading (docs/architecture.md §6): native round trips, the Hugging Face cache offline,
push_to_hub up to the network boundary, science-of-finetuning interop, and clear errors for bad files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, RepoUrl
from safetensors.torch import load_file

import crosscoder
from crosscoder import (
    BatchTopKCrossCoder,
    BatchTopKSAE,
    DictionaryFormatError,
    L1CrossCoder,
    SparseDictionary,
    load_dictionary,
)
from crosscoder.dictionary import FORMAT_VERSION

SOF_FIXTURES = Path(__file__).parent / "fixtures" / "sof"
D_MODEL, DICT_SIZE, K = 8, 16, 2
REPO_ID = "owner/name"


@pytest.fixture(autouse=True)
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test here may reach the network or read the user's cache: offline mode on and an empty cache.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import, into ``huggingface_hub.constants``:
    setting the environment alone would not reach this process."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------------- helpers
def _randomized(dictionary: SparseDictionary, seed: int = 0) -> SparseDictionary:
    """Every parameter and buffer non-trivial: biases, per-source mean and scale, and a threshold θ that
    drops some positive activations."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (dictionary.W_enc, dictionary.W_dec, dictionary.b_dec):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
        dictionary.b_enc.copy_(torch.randn(dictionary.b_enc.shape, generator=generator) * 0.1)
        dictionary.input_mean.copy_(torch.randn(dictionary.input_mean.shape, generator=generator))
        dictionary.input_scale.copy_(torch.rand(dictionary.input_scale.shape, generator=generator) * 2.0 + 0.5)
        if dictionary.uses_batch_topk:
            dictionary.threshold.fill_(0.7)
    return dictionary.eval()


def _inputs(dictionary: SparseDictionary, batch: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if isinstance(dictionary, BatchTopKSAE):
        return torch.randn(batch, dictionary.d_model, generator=generator) * 2.0
    return torch.randn(batch, dictionary.n_sources, dictionary.d_model, generator=generator) * 2.0


def _outputs(dictionary: SparseDictionary, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything a user computes from a dictionary, in the peer's names."""
    with torch.no_grad():
        if not dictionary.uses_batch_topk:
            codes = dictionary.encode(x)
            return {"encode": codes, "decode_of_encode": dictionary.decode(codes), "forward": dictionary(x)}
        codes = dictionary.encode(x, use_threshold=True)
        return {
            "encode_threshold": codes,
            "encode_topk": dictionary.encode(x, use_threshold=False),
            "decode_of_encode_threshold": dictionary.decode(codes),
            "forward": dictionary(x),
        }


def _assert_identical(loaded: SparseDictionary, original: SparseDictionary) -> None:
    assert type(loaded) is type(original)
    assert loaded.config() == original.config()
    original_state = original.state_dict()
    assert loaded.state_dict().keys() == original_state.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original_state[name]), name
    x = _inputs(original)
    for name, expected in _outputs(original, x).items():
        assert torch.equal(_outputs(loaded, x)[name], expected), name


def _all_classes() -> list[SparseDictionary]:
    return [
        _randomized(BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K, source_names=["base", "chat"])),
        _randomized(L1CrossCoder(D_MODEL, DICT_SIZE, n_sources=3)),
        _randomized(BatchTopKSAE(D_MODEL, DICT_SIZE, K, input="chat_minus_base")),
    ]


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _put_in_hf_cache(cache: Path, repo_id: str, folder: Path) -> str:
    """Lay ``folder`` out as huggingface_hub does after a download: blobs named by their sha256 (LFS files)
    or git blob sha1 (small files), ``refs/main`` holding the commit, and snapshot files as relative symlinks
    to the blobs. Returns the commit hash."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / commit
    for sub in (repo_folder / "blobs", repo_folder / "refs", snapshot):
        sub.mkdir(parents=True)
    (repo_folder / "refs" / "main").write_text(commit)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else _git_blob_sha1(data)
        (repo_folder / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return commit


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------- native round trip
@pytest.mark.parametrize("original", _all_classes(), ids=lambda d: type(d).__name__)
def test_save_pretrained_then_load_dictionary_is_bitwise_identical(original: SparseDictionary, tmp_path: Path) -> None:
    original.save_pretrained(tmp_path / "saved")
    _assert_identical(load_dictionary(tmp_path / "saved"), original)
    _assert_identical(load_dictionary(str(tmp_path / "saved")), original)


@pytest.mark.parametrize("original", _all_classes(), ids=lambda d: type(d).__name__)
def test_save_pretrained_then_class_from_pretrained_is_bitwise_identical(
    original: SparseDictionary, tmp_path: Path
) -> None:
    original.save_pretrained(tmp_path / "saved")
    _assert_identical(type(original).from_pretrained(tmp_path / "saved"), original)


def test_round_trip_keeps_nontrivial_threshold_and_normalisation(tmp_path: Path) -> None:
    original = _randomized(BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K))
    original.save_pretrained(tmp_path / "saved")
    loaded = load_dictionary(tmp_path / "saved")
    assert loaded.threshold.item() == pytest.approx(0.7)
    assert torch.equal(loaded.input_scale, original.input_scale)
    assert torch.equal(loaded.input_mean, original.input_mean)
    assert not torch.equal(loaded.input_scale, torch.ones(2))
    x = _inputs(original)
    with torch.no_grad():  # θ really matters for these inputs
        assert (loaded.encode(x) != 0).sum() < (loaded.activations_normalized(loaded.normalize(x)) > 0).sum()


def test_from_pretrained_on_another_class_says_which_class_the_folder_holds(tmp_path: Path) -> None:
    _randomized(BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K)).save_pretrained(tmp_path / "saved")
    with pytest.raises(DictionaryFormatError, match="holds a BatchTopKCrossCoder, not a L1CrossCoder"):
        L1CrossCoder.from_pretrained(tmp_path / "saved")


def test_loaded_dictionary_is_in_eval_mode(tmp_path: Path) -> None:
    _randomized(BatchTopKSAE(D_MODEL, DICT_SIZE, K)).train().save_pretrained(tmp_path / "saved")
    assert not load_dictionary(tmp_path / "saved").training


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        (
            BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K, source_names=["base", "chat"], metadata={"layer": 13}),
            {
                "format": "crosscoder",
                "format_version": FORMAT_VERSION,
                "dict_class": "BatchTopKCrossCoder",
                "d_model": 8,
                "dict_size": 16,
                "n_sources": 2,
                "k": 2,
                "init_decoder_norm": 1.0,
                "source_names": ["base", "chat"],
                "metadata": {"layer": 13},
            },
        ),
        (
            L1CrossCoder(D_MODEL, DICT_SIZE),
            {
                "format": "crosscoder",
                "format_version": FORMAT_VERSION,
                "dict_class": "L1CrossCoder",
                "d_model": 8,
                "dict_size": 16,
                "n_sources": 2,
                "init_decoder_norm": 0.05,
                "source_names": None,
                "metadata": {},
            },
        ),
        (
            BatchTopKSAE(D_MODEL, DICT_SIZE, K, input="base_minus_chat"),
            {
                "format": "crosscoder",
                "format_version": FORMAT_VERSION,
                "dict_class": "BatchTopKSAE",
                "d_model": 8,
                "dict_size": 16,
                "k": 2,
                "input": "base_minus_chat",
                "metadata": {},
            },
        ),
    ],
    ids=["BatchTopKCrossCoder", "L1CrossCoder", "BatchTopKSAE"],
)
def test_config_json_names_format_version_and_class(
    original: SparseDictionary, expected: dict[str, object], tmp_path: Path
) -> None:
    original.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == expected
    assert sorted(path.name for path in (tmp_path / "saved").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


def test_model_card_holds_config_metrics_and_usage(tmp_path: Path) -> None:
    metadata = {"metrics": {"fve": 0.876543, "l0": 100}, "layer": 13}
    dictionary = BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K, source_names=["base", "chat"], metadata=metadata)
    dictionary.save_pretrained(tmp_path / "saved", repo_id=REPO_ID)
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "library_name: crosscoder" in card
    assert "# BatchTopKCrossCoder (16 latents, d_model=8)" in card
    for row in (
        "| `d_model` | `8` |",
        "| `dict_size` | `16` |",
        "| `k` | `2` |",
        "| `class` | `BatchTopKCrossCoder` |",
    ):
        assert row in card
    assert "in order: base, chat" in card
    assert "- **fve**: 0.8765" in card
    assert "- **l0**: 100" in card
    assert "- layer: `13`" in card
    assert f'dictionary = crosscoder.load_dictionary("{REPO_ID}")' in card
    assert "x_hat = dictionary.decode(codes)" in card


def test_saving_again_regenerates_the_model_card(tmp_path: Path) -> None:
    BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K).save_pretrained(tmp_path / "saved")
    BatchTopKSAE(D_MODEL, DICT_SIZE, K).save_pretrained(tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "# BatchTopKSAE" in card
    assert "BatchTopKCrossCoder" not in card


# ---------------------------------------------------------------------------- Hugging Face cache, offline
@pytest.mark.parametrize("original", _all_classes(), ids=lambda d: type(d).__name__)
def test_repo_id_loads_offline_from_hf_hub_cache(original: SparseDictionary, tmp_path: Path, offline_hub: Path) -> None:
    original.save_pretrained(tmp_path / "saved", repo_id=REPO_ID)
    _put_in_hf_cache(offline_hub, REPO_ID, tmp_path / "saved")
    _assert_identical(load_dictionary(REPO_ID), original)
    _assert_identical(type(original).from_pretrained(REPO_ID), original)


def test_repo_id_loads_offline_from_explicit_cache_dir_and_pinned_revision(tmp_path: Path) -> None:
    original = _randomized(BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K))
    original.save_pretrained(tmp_path / "saved", repo_id=REPO_ID)
    commit = _put_in_hf_cache(tmp_path / "other_cache", REPO_ID, tmp_path / "saved")
    _assert_identical(load_dictionary(REPO_ID, cache_dir=tmp_path / "other_cache"), original)
    _assert_identical(load_dictionary(REPO_ID, cache_dir=tmp_path / "other_cache", local_files_only=True), original)
    _assert_identical(load_dictionary(REPO_ID, cache_dir=tmp_path / "other_cache", revision=commit), original)
    _assert_identical(
        BatchTopKCrossCoder.from_pretrained(REPO_ID, cache_dir=tmp_path / "other_cache", local_files_only=True),
        original,
    )


def test_sof_repo_loads_offline_from_hf_cache(offline_hub: Path) -> None:
    fixture = SOF_FIXTURES / "batchtopk_crosscoder_normalized"
    _put_in_hf_cache(offline_hub, "peer/crosscoder", fixture)
    expected = load_file(fixture / "expected.safetensors")
    _assert_matches_peer(load_dictionary("peer/crosscoder"), expected)


@pytest.mark.parametrize("local_files_only", [False, True])
def test_repo_id_absent_from_cache_offline_is_file_not_found_saying_how_to_fix(
    local_files_only: bool,
) -> None:
    message = (
        "'owner/absent' is neither a local folder nor in the Hugging Face cache.*"
        + re.escape("`hf download owner/absent`")
        + ".*or pass a local folder"
    )
    with pytest.raises(FileNotFoundError, match=message):
        load_dictionary("owner/absent", local_files_only=local_files_only)


@pytest.mark.parametrize("name", ["./missing", "/no/such/folder", "a/b/c", "nope/", "bad id/x"])
def test_path_that_is_neither_folder_nor_repo_id_is_file_not_found(name: str) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"{name} is not a local folder, and not a Hub repo id")):
        load_dictionary(name)


# ---------------------------------------------------------------------------- push_to_hub
def test_push_to_hub_uploads_a_loadable_folder_with_model_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the two network calls are replaced: create_repo answers as the Hub would, and upload_folder
    copies what it would upload."""
    uploaded = tmp_path / "uploaded"
    calls: list[tuple[str, str]] = []

    def create_repo(self: HfApi, repo_id: str, **kwargs: object) -> RepoUrl:
        calls.append(("create_repo", repo_id))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self: HfApi, *, repo_id: str, folder_path: str | Path, **kwargs: object) -> str:
        calls.append(("upload_folder", repo_id))
        shutil.copytree(folder_path, uploaded)
        return f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    original = _randomized(BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K, metadata={"metrics": {"fve": 0.9}}))

    original.push_to_hub(REPO_ID)

    assert calls == [("create_repo", REPO_ID), ("upload_folder", REPO_ID)]
    assert sorted(path.name for path in uploaded.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    card = (uploaded / "README.md").read_text()
    assert "| `dict_size` | `16` |" in card
    assert "- **fve**: 0.9" in card
    assert f'crosscoder.load_dictionary("{REPO_ID}")' in card
    _assert_identical(crosscoder.load_dictionary(uploaded), original)


# ---------------------------------------------------------------------------- science-of-finetuning interop
SOF_CLASSES = {
    "batchtopk_crosscoder": BatchTopKCrossCoder,
    "batchtopk_crosscoder_normalized": BatchTopKCrossCoder,
    "batchtopk_sae": BatchTopKSAE,
    "l1_crosscoder": L1CrossCoder,
}


def _assert_matches_peer(dictionary: SparseDictionary, expected: dict[str, torch.Tensor]) -> None:
    """Every output the peer recorded, reproduced. float32 rounding scales with the magnitude of the terms
    summed, not of each entry (the normalised fixture's codes reach ~460), so atol scales with the tensor."""
    ours = _outputs(dictionary, expected["x"])
    assert set(ours) == set(expected) - {"x"}
    for name, tensor in ours.items():
        scale = max(1.0, expected[name].abs().max().item())
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
        assert torch.equal(tensor != 0, expected[name] != 0), f"{name}: different latents active"


@pytest.mark.parametrize("form", ["folder", "checkpoint.pt"])
@pytest.mark.parametrize("fixture", sorted(SOF_CLASSES))
def test_sof_dictionary_loads_into_our_class_and_reproduces_peer_outputs(fixture: str, form: str) -> None:
    path = SOF_FIXTURES / fixture if form == "folder" else SOF_FIXTURES / fixture / "checkpoint.pt"
    dictionary = load_dictionary(path)
    assert type(dictionary) is SOF_CLASSES[fixture]
    assert dictionary.d_model == 16
    assert dictionary.dict_size == 64
    assert dictionary.k == (None if fixture == "l1_crosscoder" else 4)
    _assert_matches_peer(dictionary, load_file(SOF_FIXTURES / fixture / "expected.safetensors"))


@pytest.mark.parametrize("fixture", sorted(SOF_CLASSES))
def test_sof_checkpoint_without_config_json_is_recognised_from_its_tensors(fixture: str, tmp_path: Path) -> None:
    shutil.copy(SOF_FIXTURES / fixture / "checkpoint.pt", tmp_path / "checkpoint.pt")
    dictionary = load_dictionary(tmp_path / "checkpoint.pt")
    assert type(dictionary) is SOF_CLASSES[fixture]
    _assert_matches_peer(dictionary, load_file(SOF_FIXTURES / fixture / "expected.safetensors"))


def test_sof_normalized_crosscoder_loads_with_its_mean_and_global_scale() -> None:
    dictionary = load_dictionary(SOF_FIXTURES / "batchtopk_crosscoder_normalized")
    state = load_file(SOF_FIXTURES / "batchtopk_crosscoder_normalized" / "model.safetensors")
    assert torch.equal(dictionary.input_mean, state["activation_mean"])
    assert torch.equal(dictionary.input_scale, state["activation_global_scale"])
    assert dictionary.input_mean.abs().max() > 0.1
    assert (dictionary.input_scale - 1.0).abs().min() > 1.0
    assert dictionary.threshold.item() == pytest.approx(203.36085510253906)


def test_sof_nan_normalisation_buffers_mean_normalisation_off() -> None:
    state = load_file(SOF_FIXTURES / "batchtopk_crosscoder" / "model.safetensors")
    assert state["activation_mean"].isnan().all()
    dictionary = load_dictionary(SOF_FIXTURES / "batchtopk_crosscoder")
    assert torch.equal(dictionary.input_mean, torch.zeros(2, 16))
    assert torch.equal(dictionary.input_scale, torch.ones(2))


@pytest.mark.parametrize("fixture", sorted(SOF_CLASSES))
def test_converted_sof_dictionary_saves_and_reloads_natively(fixture: str, tmp_path: Path) -> None:
    converted = load_dictionary(SOF_FIXTURES / fixture)
    converted.save_pretrained(tmp_path / "native")
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["format"] == "crosscoder"
    assert config["dict_class"] == SOF_CLASSES[fixture].__name__
    assert config["metadata"]["converted_from"].startswith("dictionary_learning ")
    _assert_identical(load_dictionary(tmp_path / "native"), converted)


# ---------------------------------------------------------------------------- bad files
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    folder = tmp_path / "saved"
    _randomized(BatchTopKCrossCoder(D_MODEL, DICT_SIZE, K)).save_pretrained(folder)
    return folder


def _assert_load_fails_without_touching_files(folder: Path, error: type[Exception], match: str) -> None:
    before = _folder_bytes(folder)
    with pytest.raises(error, match=match):
        load_dictionary(folder)
    assert _folder_bytes(folder) == before


def test_truncated_model_safetensors_is_a_format_error(saved: Path) -> None:
    weights = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    _assert_load_fails_without_touching_files(
        saved, DictionaryFormatError, "model.safetensors cannot be read as safetensors.*corrupt or truncated"
    )


def test_corrupt_config_json_is_a_format_error(saved: Path) -> None:
    (saved / "config.json").write_text('{"format": "crosscoder", "format_vers')
    _assert_load_fails_without_touching_files(saved, DictionaryFormatError, "config.json is not valid JSON")


def test_config_json_that_is_not_an_object_is_a_format_error(saved: Path) -> None:
    (saved / "config.json").write_text("[1, 2, 3]")
    _assert_load_fails_without_touching_files(saved, DictionaryFormatError, "must hold a JSON object, got list")


def test_format_version_from_the_future_says_upgrade(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "format_version": FORMAT_VERSION + 1}))
    _assert_load_fails_without_touching_files(
        saved,
        DictionaryFormatError,
        f"format version {FORMAT_VERSION + 1}, but this crosscoder reads versions up to {FORMAT_VERSION}: upgrade",
    )


def test_unknown_dict_class_is_a_format_error_listing_known_classes(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "dict_class": "MysteryCoder"}))
    _assert_load_fails_without_touching_files(
        saved,
        DictionaryFormatError,
        re.escape("unknown dictionary class 'MysteryCoder'; known: ['BatchTopKCrossCoder', 'BatchTopKSAE'"),
    )


def test_config_json_of_neither_format_is_a_format_error(saved: Path) -> None:
    (saved / "config.json").write_text(json.dumps({"hidden_size": 8, "model_type": "llama"}))
    _assert_load_fails_without_touching_files(
        saved, DictionaryFormatError, "is neither a crosscoder dictionary .* nor a dictionary_learning one"
    )


def test_config_that_does_not_fit_the_class_is_a_format_error(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "n_layers": 2}))
    _assert_load_fails_without_touching_files(
        saved, DictionaryFormatError, "config.json does not fit BatchTopKCrossCoder.*n_layers"
    )


def test_weights_whose_shapes_disagree_with_config_name_the_tensors(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "dict_size": 32}))
    _assert_load_fails_without_touching_files(
        saved,
        DictionaryFormatError,
        "weights do not match config.json.*" + re.escape("W_enc [16, 2, 8] (config says [32, 2, 8])"),
    )


def test_folder_without_weights_is_file_not_found(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    _assert_load_fails_without_touching_files(saved, FileNotFoundError, "has no model.safetensors")


def test_truncated_checkpoint_pt_is_a_format_error(tmp_path: Path) -> None:
    for name in ("config.json", "checkpoint.pt"):
        shutil.copy(SOF_FIXTURES / "batchtopk_crosscoder" / name, tmp_path / name)
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    before = _folder_bytes(tmp_path)
    with pytest.raises(DictionaryFormatError, match=r"cannot be read as a weights-only torch checkpoint.*truncated"):
        load_dictionary(tmp_path / "checkpoint.pt")
    assert _folder_bytes(tmp_path) == before


class _WritesAFileWhenUnpickled:
    marker: Path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


def test_checkpoint_with_arbitrary_objects_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    payload = _WritesAFileWhenUnpickled()
    payload.marker = tmp_path / "pwned"
    torch.save({"encoder.weight": torch.zeros(2, 4, 8), "payload": payload}, tmp_path / "checkpoint.pt")
    with pytest.raises(DictionaryFormatError, match="holds objects other than tensors"):
        load_dictionary(tmp_path / "checkpoint.pt")
    assert not payload.marker.exists()


def test_unsupported_dictionary_learning_class_is_a_format_error(tmp_path: Path) -> None:
    shutil.copy(SOF_FIXTURES / "batchtopk_crosscoder" / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((SOF_FIXTURES / "batchtopk_crosscoder" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dict_class": "MatryoshkaCrossCoder"}))
    _assert_load_fails_without_touching_files(
        tmp_path, DictionaryFormatError, "dictionary_learning class 'MatryoshkaCrossCoder' is not supported"
    )


def test_dictionary_learning_weights_missing_a_tensor_name_it(tmp_path: Path) -> None:
    state = torch.load(SOF_FIXTURES / "l1_crosscoder" / "checkpoint.pt", weights_only=True)
    del state["decoder.bias"]
    torch.save(state, tmp_path / "checkpoint.pt")
    shutil.copy(SOF_FIXTURES / "l1_crosscoder" / "config.json", tmp_path / "config.json")
    with pytest.raises(DictionaryFormatError, match=re.escape("CrossCoder checkpoint lacks the tensor 'decoder.bias'")):
        load_dictionary(tmp_path / "checkpoint.pt")
