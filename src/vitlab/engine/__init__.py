"""Training engine: runtime (device, precision), and later optimisation and the training loop."""
