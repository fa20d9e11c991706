"""Model diffing with sparse dictionaries: BatchTopK/L1 crosscoders, their Matryoshka and dedicated-feature variants,
and difference SAEs.

The parts and how data flows between them: docs/architecture.md; every formula: docs/methods.md.
"""

from crosscoder.host_memory import gemm_buffers_from_malloc

gemm_buffers_from_malloc()  # before torch is imported: MKL reads it when torch loads it (docs/methods.md §4.2)

from crosscoder.activations import PairedActivationStream
from crosscoder.cache import ActivationCache
from crosscoder.config import TrainConfig
from crosscoder.dictionary import (
    BatchTopKCrossCoder,
    BatchTopKSAE,
    DedicatedCrossCoder,
    DictionaryFormatError,
    L1CrossCoder,
    MatryoshkaCrossCoder,
    MatryoshkaSAE,
    SparseDictionary,
)
from crosscoder.hub import load_dictionary
from crosscoder.training import train

__all__ = [
    "ActivationCache",
    "BatchTopKCrossCoder",
    "BatchTopKSAE",
    "DedicatedCrossCoder",
    "DictionaryFormatError",
    "L1CrossCoder",
    "MatryoshkaCrossCoder",
    "MatryoshkaSAE",
    "PairedActivationStream",
    "SparseDictionary",
    "TrainConfig",
    "load_dictionary",
    "train",
]
