"""Datasets: the registry, builders and converters, the canonical layout, validation, DVC."""
