"""Datasets: the on-disk contract, validation, built-in datasets and splits."""
