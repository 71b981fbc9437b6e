"""Shared infrastructure below every stage: formats and staged outputs, model loading, devices, errors."""
