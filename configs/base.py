"""The defaults every config builds on: m6jax.defaults (the package owns them).

Experiment files do `from configs.base import base_config` and change what differs.
"""

from m6jax.defaults import REPO, base_config, finetune_groups

__all__ = ["REPO", "base_config", "finetune_groups"]
