"""The embedded CPU demo: task data and the supervised warm start of a tiny model (warmstart.py)."""
