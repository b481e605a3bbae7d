"""The fedpeft Flower ServerApp: round loop, sampling, validation, checkpoints, export."""
