"""pneumoscan: pneumonia detection in chest X-rays."""

__version__ = "0.1.0"
