"""Surviving long runs: stop requests (signals, wall-clock budget, the requeue exit code; stop.py) and
nvidia-resiliency-ext fault-tolerance heartbeats (fault_tolerance.py)."""
