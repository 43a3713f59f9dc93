"""The torch engine: MoE model, checkpoints, expert cache, continuous batching."""
