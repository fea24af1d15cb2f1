"""A run directory: atomic checkpoints and resume state (safetensors only), one owner per run dir,
the metrics log and wandb."""
