"""Model diffing with sparse dictionaries: BatchTopK/L1 crosscoders and difference SAEs (see DESIGN.md)."""

from crosscoder.dictionary import (
    BatchTopKCrossCoder,
    BatchTopKSAE,
    DictionaryFormatError,
    L1CrossCoder,
    SparseDictionary,
)
from crosscoder.hub import load_dictionary

__all__ = [
    "BatchTopKCrossCoder",
    "BatchTopKSAE",
    "DictionaryFormatError",
    "L1CrossCoder",
    "SparseDictionary",
    "load_dictionary",
]
