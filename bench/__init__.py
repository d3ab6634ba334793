"""Measurements of the Saga Log (see bench/README.md)."""
