"""Run configuration: YAML in, `--set` overrides, typed sections out (schema.py: trainer / parallel /
precision / optim sections and the YAML machinery; run.py: the whole RunConfig composed with the
data, rewards, rollout and loss sections their own packages define)."""
