"""Experiments built on memdec (each folder: its script, config, README and committed results)."""
