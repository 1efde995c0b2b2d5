"""trainlab: train small experimental networks and know, with measured evidence, whether a run is healthy."""

__version__ = "0.1.0"
