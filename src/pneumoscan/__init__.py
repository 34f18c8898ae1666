"""pneumoscan: pneumonia detection in chest X-rays."""

__version__ = "0.1.0"
# The bundled model used when none is named: chosen on validation (docs/experiments.md, 7).
DEFAULT_MODEL = "ensemble"
