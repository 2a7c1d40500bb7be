"""Training: one local pass of each stage (VAE, IBE, twin), checkpoints, logs."""
