"""Data-parallel training with torchrun (gloo, 2 processes on CPU) trains what one process trains."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import crosscoder
from crosscoder import TrainConfig
from crosscoder.checkpoint import load_checkpoint
from crosscoder.distributed import Distributed
from crosscoder.sharding import shards_latents
from crosscoder.training.batches import default_batches

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
ARGS = [
    "--preset",
    "synthetic",
    "--num-tokens",
    str(256 * 30),
    "--batch-size",
    "256",
    "--dict-size",
    "64",
    "--k",
    "3",
    "--warmup-steps",
    "5",
    "--threshold-start-step",
    "10",
    "--dead-tokens",
    "2048",
    "--normalization-tokens",
    "1024",
    "--checkpoint-every",
    "10",
    "--log-every",
    "5",
    "--no-progress",
    "--device",
    "cpu",
]


def torchrun(processes: int = 2) -> list[str]:
    """``torchrun`` on a free local port (tests may run beside other torchrun jobs)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(processes),
        "--master-port",
        str(port),
    ]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_two_processes_train_the_same_dictionaries_as_one(tmp_path):
    run([sys.executable, str(TRAIN), *ARGS, "--output-dir", str(tmp_path / "one")], tmp_path)
    run([*torchrun(), str(TRAIN), *ARGS, "--output-dir", str(tmp_path / "two")], tmp_path)

    for name in ("batchtopk_crosscoder", "diff_sae"):
        assert crosscoder.load_dictionary(tmp_path / "two" / "synthetic" / name).metadata["parallelism"] == "data"
        one = load_file(tmp_path / "one" / "synthetic" / name / "model.safetensors")
        two = load_file(tmp_path / "two" / "synthetic" / name / "model.safetensors")
        for key in one:
            difference = (one[key] - two[key]).abs().max().item()
            assert difference < 1e-5 * max(1.0, one[key].abs().max().item()), f"{name}.{key} differs by {difference}"
        assert one["threshold"].item() > 0
    one_log = (tmp_path / "one" / "synthetic" / "metrics.jsonl").read_text().splitlines()[-1]
    two_log = (tmp_path / "two" / "synthetic" / "metrics.jsonl").read_text().splitlines()[-1]
    for key in ("batchtopk_crosscoder/l0", "batchtopk_crosscoder/fve", "diff_sae/l0", "batchtopk_crosscoder/loss"):
        assert json.loads(two_log)[key] == pytest.approx(json.loads(one_log)[key], rel=1e-3), key
    checkpoints = sorted((tmp_path / "two" / "synthetic" / "checkpoints").glob("*.pt"))
    assert [path.name for path in checkpoints] == ["step_000000020.pt", "step_000000030.pt"]


def assert_two_processes_train_as_one(tmp_path: Path, arguments: list[str], names: tuple[str, ...]) -> None:
    """Train with ``arguments`` in one process and data-parallel in two; the saved dictionaries ``names`` agree."""
    run([sys.executable, str(TRAIN), *arguments, "--output-dir", str(tmp_path / "one")], tmp_path)
    run([*torchrun(), str(TRAIN), *arguments, "--output-dir", str(tmp_path / "two")], tmp_path)
    for name in names:
        assert crosscoder.load_dictionary(tmp_path / "two" / "synthetic" / name).metadata["parallelism"] == "data"
        one = load_file(tmp_path / "one" / "synthetic" / name / "model.safetensors")
        two = load_file(tmp_path / "two" / "synthetic" / name / "model.safetensors")
        for key in one:
            difference = (one[key] - two[key]).abs().max().item()
            assert difference < 1e-5 * max(1.0, one[key].abs().max().item()), f"{name}.{key} differs by {difference}"


@pytest.mark.slow
def test_two_processes_train_the_same_variants_as_one(tmp_path):
    """Matryoshka and dedicated-feature dictionaries train data-parallel (auto never shards their latents)."""
    variants = [*ARGS, "--architectures", "matryoshka", "dedicated", "matryoshka_diff_sae", "--num-tokens", "5120"]
    assert_two_processes_train_as_one(
        tmp_path, variants, ("matryoshka_crosscoder", "dedicated_crosscoder", "matryoshka_diff_sae")
    )


@pytest.mark.slow
def test_two_processes_with_the_sharded_optimizer_train_as_one_and_resume_bitwise(tmp_path):
    """``--shard-optimizer yes`` (on one host, as ``auto``: through shared memory): each process updates half of every
    parameter; the dictionaries equal one process's (the SAE's renormalised decoder and the dedicated crosscoder's
    per-model decoders included), and a resume from the middle checkpoint ends bitwise where the run ended."""
    names = ("batchtopk_crosscoder", "diff_sae", "dedicated_crosscoder")
    arguments = [*ARGS, "--architectures", "batchtopk", "diff_sae", "dedicated", "--shard-optimizer", "yes"]
    arguments += ["--keep-checkpoints", "3"]
    assert_two_processes_train_as_one(tmp_path, arguments, names)
    # the parameters the processes shared are checkpointed as themselves, not with the segment they were views into
    saved = load_checkpoint(tmp_path / "two" / "synthetic" / "checkpoints" / "step_000000020.pt")
    for name in names:
        for key, tensor in saved["dictionaries"][name]["state_dict"].items():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), f"{name}.{key}"
    command = [*torchrun(), str(TRAIN), *arguments, "--output-dir", str(tmp_path / "two")]
    assert_resuming_from_the_middle_ends_bitwise_equal(command, tmp_path / "two" / "synthetic", names, tmp_path)


def assert_resuming_from_the_middle_ends_bitwise_equal(
    command: list[str], run_dir: Path, names: tuple[str, ...], cwd: Path
) -> None:
    """Drop the last of the finished run's checkpoints (steps 20 and 30 kept), resume with ``command``: the saved
    dictionaries ``names`` are bitwise the straight run's."""
    straight = {name: load_file(run_dir / name / "model.safetensors") for name in names}
    (run_dir / "checkpoints" / "step_000000030.pt").unlink()  # as if the run had died after step 20's checkpoint
    run([*command, "--resume"], cwd)
    for name, tensors in straight.items():
        resumed = load_file(run_dir / name / "model.safetensors")
        for key, value in tensors.items():
            assert torch.equal(value, resumed[key]), f"{name}.{key} differs after resume"


@pytest.mark.slow
def test_two_processes_train_a_dedicated_crosscoder_with_per_partition_budgets_as_one(tmp_path):
    """Each partition's own BatchTopK and θ are global over the processes (docs/methods.md §12.2)."""
    budgets = [*ARGS, "--architectures", "dedicated", "--exclusive-k", "1", "1", "--num-tokens", "5120"]
    assert_two_processes_train_as_one(tmp_path, budgets, ("dedicated_crosscoder",))
    threshold = load_file(tmp_path / "two" / "synthetic" / "dedicated_crosscoder" / "model.safetensors")["threshold"]
    assert threshold.shape == (3,) and (threshold > 0).all()


@pytest.mark.parametrize("shard_latents", [False, True])
def test_each_process_reads_only_its_share_of_every_global_batch(tmp_path, shard_latents):
    """Data parallel or latent-sharded, no two processes read (or stream through the models) the same tokens; the
    shares, in rank order, are the batch one process reads (latent sharding all-gathers them before the step)."""
    save_file({"activations": torch.randn(96, 2, 4)}, tmp_path / "acts.safetensors")
    config = TrainConfig(activations=tmp_path / "acts.safetensors", batch_size=16)
    alone = iter(default_batches(config, Distributed()))
    ranks = [iter(default_batches(config, Distributed(rank, 2, rank, shard_latents))) for rank in range(2)]
    for _ in range(4):
        shares = [next(rank) for rank in ranks]
        assert [len(share) for share in shares] == [8, 8]
        assert torch.equal(torch.cat(shares), next(alone))


def test_auto_parallelism_splits_the_latents_when_that_communicates_less():
    def auto(dict_size: int, **fields) -> bool:
        config = TrainConfig(**{"batch_size": 4096, "k": 64, "dict_size": dict_size, **fields})
        return shards_latents(config, 2, dict_size)

    assert auto(dict_size=16384)  # 16,384 latents against 4,096 tokens: move the batch, not the gradients
    assert auto(dict_size=4096)
    assert not auto(dict_size=2048)  # fewer latents than tokens: all-reduce the gradients
    assert not auto(dict_size=16385)  # does not split evenly
    assert not auto(dict_size=16384, architectures=("batchtopk", "l1"))  # L1 crosscoders are not sharded
    assert not auto(dict_size=128, batch_size=64, k=64)  # 64 latents per process would not exceed k
    assert shards_latents(TrainConfig(parallelism="latents", batch_size=4096), 2, 2048)
    assert not shards_latents(TrainConfig(parallelism="data"), 2, 16384)
    assert not shards_latents(TrainConfig(parallelism="latents"), 1, 16384)  # a single process splits nothing
    with pytest.raises(ValueError, match="parallelism='latents' supports the BatchTopK dictionaries"):
        TrainConfig(parallelism="latents", architectures=("l1",))


@pytest.mark.slow
def test_a_distributed_run_resumes_with_the_same_number_of_processes(tmp_path):
    short = [*ARGS, "--output-dir", str(tmp_path)]
    run([*torchrun(), str(TRAIN), *short], tmp_path)
    single = subprocess.run(
        [sys.executable, str(TRAIN), *short, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert single.returncode == 2 and "resume with the same number of processes" in single.stderr


@pytest.mark.slow
def test_a_distributed_run_resumed_from_a_middle_checkpoint_ends_bitwise_equal(tmp_path):
    command = [*torchrun(), str(TRAIN), *ARGS, "--keep-checkpoints", "3", "--output-dir", str(tmp_path)]
    run(command, tmp_path)
    names = ("batchtopk_crosscoder", "diff_sae")
    assert_resuming_from_the_middle_ends_bitwise_equal(command, tmp_path / "synthetic", names, tmp_path)


@pytest.mark.slow
def test_latent_sharded_training_equals_one_process_and_saves_one_consolidated_file(tmp_path):
    # 256 latents for 256-token batches: parallelism "auto" splits the latents; many die: AuxK spans both processes
    arguments = [*ARGS, "--dict-size", "256", "--dead-tokens", "256"]
    run([sys.executable, str(TRAIN), *arguments, "--output-dir", str(tmp_path / "one")], tmp_path)
    sharded = [*arguments, "--keep-checkpoints", "3", "--output-dir", str(tmp_path / "sharded")]
    run([*torchrun(), str(TRAIN), *sharded], tmp_path)
    run_dir = tmp_path / "sharded" / "synthetic"
    for name in ("batchtopk_crosscoder", "diff_sae"):
        one = load_file(tmp_path / "one" / "synthetic" / name / "model.safetensors")
        two = load_file(run_dir / name / "model.safetensors")
        assert two["W_dec"].shape[0] == 256  # consolidated: every latent in one file
        assert crosscoder.load_dictionary(run_dir / name).metadata["parallelism"] == "latents"
        for key in one:
            difference = (one[key] - two[key]).abs().max().item()
            assert difference < 1e-5 * max(1.0, one[key].abs().max().item()), f"{name}.{key} differs by {difference}"
    one_log = json.loads((tmp_path / "one" / "synthetic" / "metrics.jsonl").read_text().splitlines()[-1])
    two_log = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert one_log["batchtopk_crosscoder/aux_loss"] > 0
    for key in (
        "batchtopk_crosscoder/l0",
        "batchtopk_crosscoder/dead_fraction_train",
        "batchtopk_crosscoder/aux_loss",
        "diff_sae/fve",
    ):
        assert two_log[key] == pytest.approx(one_log[key], rel=1e-3, abs=1e-6), key

    final = {name: load_file(run_dir / name / "model.safetensors") for name in ("batchtopk_crosscoder", "diff_sae")}
    (run_dir / "checkpoints" / "step_000000030.pt").unlink()
    run([*torchrun(), str(TRAIN), *sharded, "--resume"], tmp_path)
    for name, tensors in final.items():
        resumed = load_file(run_dir / name / "model.safetensors")
        assert all(torch.equal(value, resumed[key]) for key, value in tensors.items()), name

    # both modes read the same shares and checkpoints are consolidated: a run may resume in the other mode
    (run_dir / "checkpoints" / "step_000000030.pt").unlink()
    run([*torchrun(), str(TRAIN), *sharded, "--resume", "--parallelism", "data"], tmp_path)
    for name, tensors in final.items():
        assert crosscoder.load_dictionary(run_dir / name).metadata["parallelism"] == "data"
        resumed = load_file(run_dir / name / "model.safetensors")
        for key, value in tensors.items():
            difference = (value - resumed[key]).abs().max().item()
            assert difference < 1e-5 * max(1.0, value.abs().max().item()), f"{name}.{key} differs by {difference}"


@pytest.mark.slow
def test_latent_sharded_validation_reports_what_one_process_reports(tmp_path):
    worker = Path(__file__).with_name("validation_worker.py")
    one = run([sys.executable, str(worker), str(tmp_path / "one")], tmp_path)
    two = run([*torchrun(), str(worker), str(tmp_path / "two"), "latents"], tmp_path)
    alone, sharded = json.loads(one.stdout.splitlines()[-1]), json.loads(two.stdout.splitlines()[-1])
    for name in ("batchtopk_crosscoder", "diff_sae"):
        assert alone[name]["fve"] > 0 and alone[name]["l0"] > 0 and alone[name]["dead_fraction"] < 1
        for key in ("fve", "fve_source_0", "l0", "dead_fraction"):
            assert sharded[name][key] == pytest.approx(alone[name][key], rel=1e-4, abs=1e-6), f"{name} {key}"


@pytest.mark.slow
def test_uneven_data_stops_every_rank_together_instead_of_hanging(tmp_path):
    worker = Path(__file__).with_name("uneven_worker.py")
    result = subprocess.run(
        [*torchrun(), str(worker), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "rank 0: the batch source ran out after 20 of 30 steps on at least one process" in result.stdout
    assert "rank 1: the batch source ran out after 20 of 30 steps" in result.stdout
    assert crosscoder.load_dictionary(tmp_path / "run" / "batchtopk_crosscoder").metadata["training_steps"] == 20


@pytest.mark.slow
def test_latents_that_do_not_split_over_the_processes_are_refused_before_any_compute(tmp_path):
    result = subprocess.run(
        [*torchrun(), str(TRAIN), *ARGS, "--parallelism", "latents", "--dict-size", "63", "--output-dir", tmp_path],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "dict_size=63 does not split evenly over 2 processes" in result.stderr
    assert not (tmp_path / "synthetic" / "checkpoints").exists()


@pytest.mark.slow
def test_a_killed_rank_then_resume_finishes_with_the_right_step_count(tmp_path):
    arguments = [*ARGS, "--num-tokens", str(256 * 300), "--keep-checkpoints", "2", "--output-dir", str(tmp_path)]
    job = subprocess.Popen(
        [*torchrun(), str(TRAIN), *arguments],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    checkpoints = tmp_path / "synthetic" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(checkpoints.glob("step_*.pt"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "torchrun started no worker"
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies mid-run; torchrun stops the others
    assert job.wait(timeout=120) != 0
    assert not (tmp_path / "synthetic" / "batchtopk_crosscoder").exists()

    run([*torchrun(), str(TRAIN), *arguments, "--resume"], tmp_path)
    cc = crosscoder.load_dictionary(tmp_path / "synthetic" / "batchtopk_crosscoder")
    assert cc.metadata["training_steps"] == 300 and cc.metadata["training_tokens"] == 300 * 256
    last = json.loads((tmp_path / "synthetic" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 300
