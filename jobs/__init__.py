"""Entrypoints a person or a scheduler runs: `python -m jobs.<name>` or `hovle <name>`."""
