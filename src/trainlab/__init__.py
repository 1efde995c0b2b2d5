"""trainlab: train small experimental networks and know, with measured evidence, whether a run is healthy."""

from trainlab.engine.callbacks import Callback, Evaluation

__version__ = "0.1.0"
__all__ = ["Callback", "Evaluation", "__version__"]
