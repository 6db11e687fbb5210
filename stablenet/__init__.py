"""stablenet: stable names and addresses for containers on a Docker host."""

__version__ = "0.1.0"
