"""stablenet: stable names and addresses for containers on a Docker host."""

from stablenet import native

__version__ = "0.1.0"
__path__ = native.extend(__name__, __path__)
