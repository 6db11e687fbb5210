"""The controller: keeps labelled services alive and at their declared size (healing, desired
replicas) through the Engine API, and never acts on anything else."""

from stablenet.controller.loop import Controller

__all__ = ["Controller"]
