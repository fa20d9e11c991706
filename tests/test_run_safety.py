"""A run's written work is safe: no silent overwrite, a checkpoint on SIGINT / SIGTERM, finished runs left intact,
early ends saved, pushes after local saves, resume only on the run's own data, verified checkpoints, actionable
advice, one metrics line per step, and a diverged run blamed on its learning rate."""

import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import planted_runs
import pytest
import torch
from planted_runs import PLANTED
from safetensors.torch import save_file

import crosscoder
from crosscoder.cache import ActivationCache
from crosscoder.checkpoint import checksum_path, list_checkpoints, load_checkpoint, save_checkpoint
from crosscoder.chunks import ActivationChunk
from crosscoder.errors import CheckpointError, ConfigError, CrosscoderError, NonFiniteError, OutputExistsError
from crosscoder.synthetic import PlantedActivations
from crosscoder.training import RunInterrupted
from crosscoder.training.checkpointing import check_data_source

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def sigint_heard() -> Iterator[None]:
    """These tests send SIGINT to runs. A suite started in the background by a shell without job control (``pytest
    &`` in a script) has it ignored, and so would the runs it starts (a run keeps an ignored signal ignored, on
    purpose): Python's own handler while a test runs, which a started process gets back as the default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def small_config(tmp_path: Path, **overrides) -> crosscoder.TrainConfig:
    """20 steps, checkpoints every 10."""
    values = dict(
        num_tokens=256 * 20, warmup_steps=5, threshold_start_step=5, normalization_tokens=512, checkpoint_every=10,
        log_every=5,
    )  # fmt: skip
    return planted_runs.small_config(tmp_path, **{**values, **overrides})


def planted() -> PlantedActivations:
    return PlantedActivations(PLANTED, 256, seed=1)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli_args(output_dir: Path, steps: int) -> list[str]:
    """train.py on planted data (a BatchTopK crosscoder and a diff-SAE), small and fast."""
    return [
        *("--preset", "synthetic", "--batch-size", "256", "--dict-size", "64", "--k", "3"),
        *("--num-tokens", str(256 * steps), "--checkpoint-every", "10", "--log-every", "5"),
        *("--normalization-tokens", "1024", "--warmup-steps", "5", "--threshold-start-step", "10"),
        *("--dead-tokens", "2048", "--no-progress", "--device", "cpu", "--output-dir", str(output_dir)),
    ]


def signal_after_first_checkpoint(command: list[str], run_dir: Path, signum: int, pid_of=None):
    """Start ``command``, send ``signum`` once its first checkpoint exists (to the process ``pid_of(process)``
    names, default the process itself), and return (exit status, stderr)."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not list_checkpoints(run_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    os.kill(pid_of(process) if pid_of else process.pid, signum)
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # not stopped: ended here (workers too), not left to slow the rest of the suite
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, stderr


# ---------------------------------------------------------------------------- 2: no silent overwrite
def test_a_finished_run_whose_checkpoints_were_deleted_is_not_overwritten(tmp_path):
    config = small_config(tmp_path)
    crosscoder.train(config, planted())
    shutil.rmtree(config.run_dir / "checkpoints")  # deleted to save space
    before = folder_bytes(config.run_dir)

    with pytest.raises(
        OutputExistsError, match=r"already holds an earlier run \(batchtopk_crosscoder/, metrics\.jsonl"
    ):
        crosscoder.train(config, planted())
    with pytest.raises(CheckpointError, match=r"holds no checkpoint; it holds .* move .* aside"):
        crosscoder.train(dataclasses.replace(config, resume=True), planted())
    assert folder_bytes(config.run_dir) == before


# ---------------------------------------------------------------------------- 3: SIGINT / SIGTERM
@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path, signum, status):
    command = [sys.executable, str(TRAIN), *cli_args(tmp_path, steps=300)]
    run_dir = tmp_path / "synthetic"
    returncode, stderr = signal_after_first_checkpoint(command, run_dir, signum)

    assert returncode == status, stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr
    assert f"stopped by {signal.Signals(signum).name} at step" in stderr and "--resume" in stderr
    step = int(stderr.split(" at step ")[1].split()[0])
    assert 10 < step < 300
    assert load_checkpoint(list_checkpoints(run_dir)[-1])["step"] == step
    assert not (run_dir / "batchtopk_crosscoder").exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("batchtopk_crosscoder", "diff_sae"):
        assert crosscoder.load_dictionary(run_dir / name).metadata["training_steps"] == 300
    steps = logged_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 300


@pytest.mark.slow
def test_ctrl_c_stops_a_paired_stream_run_cleanly(tmp_path):
    """The stream computes blocks in a background thread: the process still exits normally (no SIGABRT)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import build_tokenizer, local_pair_config

    config = local_pair_config(tmp_path, build_tokenizer(), documents=400)
    command = [
        *(sys.executable, str(TRAIN), "--base-model", config.base_model, "--chat-model", config.chat_model),
        *("--datasets", *config.datasets, "--layers", "2", "--model-dtype", "float32", "--context-length", "32"),
        *("--block-sequences", "16", "--k", "4", "--dict-size", "64", "--batch-size", "64"),
        *("--normalization-tokens", "256", "--num-tokens", str(64 * 100_000), "--checkpoint-every", "10"),
        *("--no-progress", "--device", "cpu", "--output-dir", str(tmp_path / "runs")),
    ]
    returncode, stderr = signal_after_first_checkpoint(command, tmp_path / "runs" / "run", signal.SIGINT)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr and "--resume" in stderr


def torchrun() -> list[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]


def rank_pid(torchrun_process: subprocess.Popen, rank: int) -> int:
    """The pid of a torchrun worker, found by the RANK in its environment."""
    children = subprocess.run(["pgrep", "-P", str(torchrun_process.pid)], capture_output=True, text=True)
    for pid in children.stdout.split():
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    command = [*torchrun(), str(TRAIN), *cli_args(tmp_path, steps=300)]
    run_dir = tmp_path / "synthetic"
    returncode, stderr = signal_after_first_checkpoint(
        command, run_dir, signal.SIGTERM, pid_of=lambda process: rank_pid(process, 1)
    )
    assert returncode != 0
    # rank 0, told by rank 1, stops at the same step (else the checkpoint's collectives would hang)
    steps = {int(part.split()[0]) for part in stderr.split("stopped by SIGTERM at step ")[1:]}
    assert len(steps) == 1, stderr
    assert load_checkpoint(list_checkpoints(run_dir)[-1])["step"] == steps.pop()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert crosscoder.load_dictionary(run_dir / "diff_sae").metadata["training_steps"] == 300


# ---------------------------------------------------------------------------- 4: resuming a finished run
def test_resuming_a_finished_run_leaves_its_dictionaries_and_metrics_intact(tmp_path):
    config = small_config(tmp_path)
    trained = crosscoder.train(config, planted())["batchtopk_crosscoder"]
    assert "fve" in trained.metadata["metrics"]
    before = folder_bytes(config.run_dir)

    with pytest.warns(UserWarning, match="already finished at step 20"):
        again = crosscoder.train(dataclasses.replace(config, resume=True), planted())
    assert folder_bytes(config.run_dir) == before
    assert again["batchtopk_crosscoder"].metadata["metrics"] == trained.metadata["metrics"]


def test_a_final_checkpoint_without_saved_dictionaries_saves_them_with_the_last_metrics(tmp_path):
    config = small_config(tmp_path)
    crosscoder.train(config, planted())
    folder = config.run_dir / "batchtopk_crosscoder"
    saved = folder_bytes(folder)  # config.json (metadata, metrics), model.safetensors, README.md (model card)
    shutil.rmtree(folder)  # as if the run died right after its last checkpoint

    crosscoder.train(dataclasses.replace(config, resume=True), planted())
    assert folder_bytes(folder) == saved


# ---------------------------------------------------------------------------- 5: ending early
def test_a_source_shorter_than_num_tokens_saves_what_was_trained(tmp_path):
    config = small_config(tmp_path, num_tokens=256 * 60)
    batches = [PLANTED.sample(256, torch.Generator().manual_seed(i)) for i in range(25)]
    with pytest.warns(UserWarning, match=r"ran out after 25 of 60 steps: the run ended early.*step_000000025\.pt"):
        crosscoder.train(config, batches)

    assert load_checkpoint(list_checkpoints(config.run_dir)[-1])["step"] == 25
    saved = crosscoder.load_dictionary(config.run_dir / "batchtopk_crosscoder")
    assert saved.metadata["training_steps"] == 25 and saved.metadata["training_tokens"] == 25 * 256
    assert saved.metadata["ended_early"] == {"reason": "the batch source ran out", "planned_tokens": 256 * 60}
    assert logged_steps(config.run_dir)[-1] == 25


def crashed_after_step_20(tmp_path: Path, **overrides) -> crosscoder.TrainConfig:
    """A 40-step run whose last checkpoints (30, 40) and dictionaries are gone, as if it died after step 20's
    checkpoint having logged up to step 40."""
    config = small_config(tmp_path, num_tokens=256 * 40, keep_checkpoints=4, **overrides)
    crosscoder.train(config, planted())
    for path in list_checkpoints(config.run_dir)[2:]:
        path.unlink()
    shutil.rmtree(config.run_dir / "batchtopk_crosscoder")
    return dataclasses.replace(config, resume=True)


def test_num_tokens_may_be_lowered_on_resume_to_finish_early(tmp_path):
    config = crashed_after_step_20(tmp_path, decay_fraction=0.5)
    with pytest.raises(ConfigError, match="below the 5120 tokens"):
        crosscoder.train(dataclasses.replace(config, num_tokens=256 * 10), planted())
    with pytest.raises(ConfigError, match="num_tokens differ"):
        crosscoder.train(dataclasses.replace(config, num_tokens=256 * 50), planted())

    crosscoder.train(dataclasses.replace(config, num_tokens=256 * 30), planted())
    saved = crosscoder.load_dictionary(config.run_dir / "batchtopk_crosscoder")
    assert saved.metadata["training_steps"] == 30
    assert saved.metadata["ended_early"] == {"reason": "num_tokens was lowered on resume", "planned_tokens": 256 * 40}
    assert saved.metadata["metrics"]["lr"] == 0  # the decay follows the new total: it ends at step 30


# ---------------------------------------------------------------------------- 6: pushing to the Hub
@pytest.mark.slow
def test_a_failed_push_is_one_error_after_every_dictionary_is_saved(tmp_path):
    command = [sys.executable, str(TRAIN), *cli_args(tmp_path, steps=20), "--push-to-hub", "nobody/fake-repo"]
    offline = {**ENV, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=offline)

    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: pushing batchtopk_crosscoder to the Hub repo nobody/fake-repo-batchtopk_crosscoder")
    assert "are saved completely" in error and "push_to_hub('nobody/fake-repo-diff_sae')" in error
    for name in ("batchtopk_crosscoder", "diff_sae"):
        assert crosscoder.load_dictionary(tmp_path / "synthetic" / name).metadata["training_steps"] == 20

    before = folder_bytes(tmp_path / "synthetic")  # pushing again with --resume trains and writes nothing
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=offline)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == error
    assert folder_bytes(tmp_path / "synthetic") == before


# ---------------------------------------------------------------------------- 8: resume only on the run's data
def test_a_checkpoint_naming_relative_model_folders_resumes_from_its_folder_only(tmp_path, monkeypatch):
    """An earlier release recorded a paired stream's local models and datasets as given; today's record is absolute
    (``recorded_location``): the relative names are resolved from the folder the resume runs in."""
    for folder in ("run/models/base", "run/models/chat", "elsewhere"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "run" / "general.jsonl").write_text("{}\n")
    now = {
        "source": "paired models",
        "base_model": str(tmp_path / "run" / "models" / "base"),
        "chat_model": str(tmp_path / "run" / "models" / "chat"),
        "datasets": [str(tmp_path / "run" / "general.jsonl"), "owner/hub-dataset"],
    }
    earlier = {**now, "base_model": "models/base", "chat_model": "models/chat"}
    earlier["datasets"] = ["general.jsonl", "owner/hub-dataset"]
    checkpoint = {"data_fingerprint": earlier}
    monkeypatch.chdir(tmp_path / "run")
    check_data_source(tmp_path / "step.pt", checkpoint, now)
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"base_model is '.*models/base' in the checkpoint but"):
        check_data_source(tmp_path / "step.pt", checkpoint, now)


def test_resume_on_another_activation_file_is_refused(tmp_path):
    first, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"activations": PLANTED.sample(256 * 24, torch.Generator().manual_seed(0))}, first)
    save_file({"activations": PLANTED.sample(256 * 24, torch.Generator().manual_seed(1))}, other)
    config = small_config(tmp_path, activations=first)
    crosscoder.train(config)

    with pytest.raises(CheckpointError, match=r"on other data than the run started on: sha256 is '[0-9a-f]{64}' in"):
        crosscoder.train(dataclasses.replace(config, resume=True, activations=other))
    shutil.copy(first, other)  # the same data under another name resumes
    with pytest.warns(UserWarning, match="already finished"):
        crosscoder.train(dataclasses.replace(config, resume=True, activations=other))


class PairChunks:
    """A finite ChunkSource of planted pairs; ``swapped`` puts the chat model first, as a build with the models
    exchanged would."""

    def __init__(self, swapped: bool = False) -> None:
        self.swapped, self.chunk = swapped, 0

    def chunks(self):
        while self.chunk < 4:
            x = PLANTED.sample(512, torch.Generator().manual_seed(self.chunk))
            self.chunk += 1
            yield ActivationChunk(x.flip(1) if self.swapped else x, torch.arange(512))

    def state_dict(self) -> dict[str, Any]:
        return {"chunk": self.chunk}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chunk = state["chunk"]

    def description(self) -> dict[str, Any]:
        models = ["org/chat", "org/base"] if self.swapped else ["org/base", "org/chat"]
        return {"base_model": models[0], "chat_model": models[1], "layers": [3], "d_model": 16}


def test_resume_on_a_cache_built_with_base_and_chat_swapped_is_refused(tmp_path):
    right = ActivationCache.build(tmp_path / "right", PairChunks(), 2048, shard_tokens=1024, progress=False)
    swapped = ActivationCache.build(tmp_path / "swapped", PairChunks(True), 2048, shard_tokens=1024, progress=False)
    config = small_config(tmp_path, cache=right, num_tokens=256 * 20)
    crosscoder.train(config)
    with pytest.raises(CheckpointError, match="base_model is 'org/base' in the checkpoint but 'org/chat' now"):
        crosscoder.train(dataclasses.replace(config, resume=True, cache=swapped))


def test_a_checkpoint_without_a_data_fingerprint_resumes_with_a_warning(tmp_path):
    activations = tmp_path / "a.safetensors"
    save_file({"activations": PLANTED.sample(256 * 24, torch.Generator().manual_seed(0))}, activations)
    config = small_config(tmp_path, activations=activations, num_tokens=256 * 10)
    crosscoder.train(config)
    latest = list_checkpoints(config.run_dir)[-1]
    state = torch.load(latest, weights_only=True)
    del state["data_fingerprint"]  # as written by an older crosscoder
    torch.save(state, latest)
    checksum_path(latest).unlink()
    with pytest.warns(UserWarning, match="records no fingerprint of its data"):
        crosscoder.train(dataclasses.replace(config, resume=True))


# ---------------------------------------------------------------------------- 9 and 15a: damaged checkpoints
def flip_a_byte_of_the_largest_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_and_extra = int.from_bytes(data[largest.header_offset + 26 : largest.header_offset + 28], "little")
    name_and_extra += int.from_bytes(data[largest.header_offset + 28 : largest.header_offset + 30], "little")
    data[largest.header_offset + 30 + name_and_extra + largest.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def follow_the_advice(message: str) -> None:
    """Run the ``mv`` command an error message suggests."""
    subprocess.run(shlex.split(message.split("`")[1]), check=True)


def test_flipped_bytes_in_a_checkpoint_are_refused_and_the_previous_one_is_named(tmp_path):
    config = crashed_after_step_20(tmp_path)
    latest = list_checkpoints(config.run_dir)[-1]
    flip_a_byte_of_the_largest_tensor(latest)
    with pytest.raises(
        CheckpointError, match=r"step_000000020\.pt does not match its sha256.*step_000000010\.pt"
    ) as error:
        crosscoder.train(config, planted())

    follow_the_advice(str(error.value))
    crosscoder.train(config, planted())
    assert crosscoder.load_dictionary(config.run_dir / "batchtopk_crosscoder").metadata["training_steps"] == 40


def test_a_view_into_a_larger_tensor_is_checkpointed_as_its_own_values(tmp_path):
    """torch.save writes a tensor's whole storage: a view (a data-parallel run's parameters in the segment they share
    with every process's gradients) is saved as a copy, and the file holds its values only."""
    segment = torch.arange(3_000, dtype=torch.float32)
    view = segment[1_000:1_010].view(2, 5)
    path = save_checkpoint({"dictionaries": {"a": {"state_dict": {"W": view}}}}, tmp_path, step=1, keep=1)
    saved = load_checkpoint(path)["dictionaries"]["a"]["state_dict"]["W"]
    assert torch.equal(saved, view)
    assert saved.untyped_storage().nbytes() == 10 * 4 and path.stat().st_size < 3_000 * 4


def test_checkpoints_written_before_checksums_are_read(tmp_path):
    config = crashed_after_step_20(tmp_path)
    for path in list_checkpoints(config.run_dir):
        checksum_path(path).unlink()
    crosscoder.train(config, planted())
    assert crosscoder.load_dictionary(config.run_dir / "batchtopk_crosscoder").metadata["training_steps"] == 40


def test_the_advice_for_a_corrupt_only_checkpoint_leads_to_a_fresh_run(tmp_path):
    config = small_config(tmp_path, keep_checkpoints=1)
    crosscoder.train(config, planted())
    flip_a_byte_of_the_largest_tensor(list_checkpoints(config.run_dir)[-1])
    with pytest.raises(CheckpointError, match="no earlier checkpoint exists") as error:
        crosscoder.train(dataclasses.replace(config, resume=True), planted())

    follow_the_advice(str(error.value))
    crosscoder.train(config, planted())  # starting again without --resume is no longer refused
    assert crosscoder.load_dictionary(config.run_dir / "batchtopk_crosscoder").metadata["training_steps"] == 20


# ---------------------------------------------------------------------------- 15b, 15c
def test_a_resumed_run_logs_every_step_once(tmp_path):
    config = crashed_after_step_20(tmp_path)
    crosscoder.train(config, planted())
    assert logged_steps(config.run_dir) == list(range(5, 41, 5))


def test_a_loss_that_diverges_after_an_update_blames_the_learning_rate(tmp_path):
    with pytest.raises(NonFiniteError, match=r"loss became NaN/Inf at step 1 .*learning rate.*--lr 1e\+30"):
        crosscoder.train(small_config(tmp_path, lr=1e30), planted())


def test_a_run_interrupted_in_python_raises_after_its_checkpoint(tmp_path):
    """``train`` in a Python session: SIGINT ends it with RunInterrupted, a checkpoint and the handlers restored."""

    def interrupting():
        for index, batch in enumerate(planted()):
            if index == 12:
                signal.raise_signal(signal.SIGINT)
            yield batch

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(
        RunInterrupted, match=r"stopped by SIGINT at step 13 of 20.*step_000000013\.pt.*--resume"
    ) as stopped:
        crosscoder.train(small_config(tmp_path), interrupting())  # batch 12 is trained on (step 12), then it stops
    assert stopped.value.exit_status == 130 and isinstance(stopped.value, CrosscoderError)
    assert signal.getsignal(signal.SIGINT) is handler
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["step"] == 13


def test_a_batch_too_large_for_memory_is_one_message_with_a_smaller_batch(tmp_path):
    """A score matrix of 65,536 tokens × 2²⁰ latents (256 GiB) cannot be allocated: one message naming the size and a
    batch that is 4× smaller, exit 2, no traceback. The matrix is formed whole on the Triton backend (a GPU's; forced
    here): the CPU's reference backend selects in latent blocks without it."""
    flags = ["--synthetic", "--batch-size", "65536", "--dict-size", "1048576", "--k", "4", "--num-tokens", "65536"]
    flags += ["--normalization-tokens", "65536", "--output-dir", str(tmp_path), "--run-name", "huge", "--no-progress"]
    environment = {**os.environ, "CROSSCODER_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    finished = subprocess.run(
        [sys.executable, str(TRAIN), *flags], capture_output=True, text=True, timeout=300, env=environment
    )
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert "out of memory while training batchtopk_crosscoder at step 0" in finished.stderr
    assert "274877906944 bytes" in finished.stderr and "try --batch-size 16384" in finished.stderr
    assert "Traceback" not in finished.stderr
