"""The deep route: torch networks, their weights, tiled inference and training.

Importing this package does not import torch; its modules do.
"""
