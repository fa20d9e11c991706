"""Training: ``train`` (the loop, ``loop.py``) feeds one batch stream to one or more dictionaries (``Trainee``,
``trainee.py``), each taking the one training step of ``step.py`` (the step the tests and ``bench/step.py`` use)
under the schedules of ``schedules.py``; ``checkpointing.py`` resumes and writes checkpoints, ``monitoring.py``
validates and guards against NaN/Inf, ``run_log.py`` logs, ``saving.py`` saves with provenance, ``interruption.py``
turns SIGINT / SIGTERM into a checkpoint at the next step boundary."""

from crosscoder.training.interruption import RunInterrupted
from crosscoder.training.loop import train
from crosscoder.training.monitoring import validate
from crosscoder.training.step import StepResult, training_loss, training_step
from crosscoder.training.trainee import Trainee

__all__ = ["RunInterrupted", "StepResult", "Trainee", "train", "training_loss", "training_step", "validate"]
