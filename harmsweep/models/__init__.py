"""Models: loading checkpoints (one resolver), their anatomy (which weights are scored), base weights, activations."""
