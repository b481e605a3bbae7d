"""The fedpeft Flower ClientApp."""
