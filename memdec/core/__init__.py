"""Shared infrastructure below every stage: on-disk formats and staged outputs."""
