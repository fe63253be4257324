"""thack_jax: distillation from imperfect teachers, and teacher-hacking diagnostics."""

__version__ = "0.1.0"
