"""Training: mesh and sharding rules, checkpoints, metric writing, the trainer loop."""
