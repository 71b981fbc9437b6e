"""memdec's lm-eval tasks (YAML configs, groups and utils.py); `memdec-eval` puts this folder on the task path."""
