"""Launch-time checks of a run config against a cluster allocation (L3; no megatron / vllm import).

Owns: the parallel-layout checks for a world size (`layout.py`), the parameter counts of one pipeline
stage on one GPU (`model_size.py`) and the per-GPU memory estimate (`memory.py`) that
`python -m megatron_gift.cli.dry_run` prints before a Slurm job is submitted. Nothing here starts a process
group or touches a GPU.
"""
