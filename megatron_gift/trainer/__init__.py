"""The RL trainer: assembly of the parts from a RunConfig, the step loop, checkpointing of its stateful
parts, and console / metrics reporting. See docs/architecture.md for the data flow of one step."""
