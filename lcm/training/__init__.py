"""The training loop (names no objective), distributed set-up and FSDP, validation."""
