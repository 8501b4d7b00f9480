"""Command-line entry points (console scripts megatron-gift-*): train, dry-run, convert-hf-to-mcore,
convert-mcore-to-hf, evaluate, plot. tools/*.py are thin shims over these modules."""
