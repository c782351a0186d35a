"""m6jax: multimodal (text + image) product classification in JAX/Flax."""

__version__ = "0.1.0"
