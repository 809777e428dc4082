"""The package's version, a leaf (model files record it; :mod:`ngmm_formula` re-exports it)."""

__version__ = "0.1.0"
