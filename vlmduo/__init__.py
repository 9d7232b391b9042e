"""vlmduo: a small VLM reasons, a large VLM answers, on your own machine."""

__version__ = "0.1.0"
