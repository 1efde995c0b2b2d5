"""The memory LM study: a byte-level language model with window attention and a per-head decaying memory
(model.py), its recall test (recall.py), data (data.py), the experiment (experiment.py) and the memory
ablation's sweep rules (ablation.py)."""

from trainlab.experiments.memory_lm.experiment import EXPERIMENT

__all__ = ["EXPERIMENT"]
