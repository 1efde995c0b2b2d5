"""The ternary VAE with hyperbolic latents (the ternary VAE study): `trainlab run ternary_vae`."""

from trainlab.experiments.ternary_vae.experiment import EXPERIMENT, TernaryVAEExperiment  # noqa: F401
