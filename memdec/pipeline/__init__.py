"""The training pipeline, one module per stage: data (windows) -> keys -> datastore -> search (index)
-> targets -> train; run.py sequences them from a YAML config."""
