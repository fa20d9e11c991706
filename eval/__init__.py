"""Evaluation of trained dictionaries (installed as ``crosscoder.eval``): reads dictionaries and activations,
never trains."""
