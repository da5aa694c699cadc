"""manifoldnorm: geometric normalization for deep learning.

Layers: ``manifoldnorm.functional`` (pure tensor math) → ``manifoldnorm.nn`` / ``models`` / ``optim`` /
``data`` (stateful building blocks, no Lightning or Hydra) → ``manifoldnorm.lit`` (Lightning).
"""

__version__ = "0.1.0"
