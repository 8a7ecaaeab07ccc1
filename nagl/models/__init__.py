"""Frozen backbones, their weights, and the on-disk feature cache."""
