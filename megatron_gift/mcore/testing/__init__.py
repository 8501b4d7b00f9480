"""Test support only (never used by the trainer): the multi-process gloo harness (harness.py)."""
