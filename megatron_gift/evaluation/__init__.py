"""Evaluation of a model (HF or converted Megatron) on prompt data: greedy and pass@k (evaluate.py)."""
