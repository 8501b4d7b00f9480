"""This process's compute device: the current CUDA device where CUDA is available, else the CPU.

The one place that decides it (the runtime, the schedule's metric reductions and the weight-sync
broadcasts all ask here), so a collective never mixes devices.
"""
from __future__ import annotations

import torch


def compute_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
