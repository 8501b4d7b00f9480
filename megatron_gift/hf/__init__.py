"""Hugging Face checkpoints: the model-family table (arch.py), safetensors reading / writing and atomic
output directories (files.py), and the HF <-> Megatron parameter-name mapping (mapping.py) that the
converters and the vLLM weight sync share. Pure torch; the Megatron side lives in mcore/convert.py."""
