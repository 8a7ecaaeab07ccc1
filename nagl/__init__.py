"""NAGL: a benchmark platform for generalist anomaly detection."""

__version__ = "0.1.0"
