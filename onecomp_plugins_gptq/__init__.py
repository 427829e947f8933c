"""onecomp-plugins-gptq: second-order layer-wise projectors for the uniform format."""
__version__ = "0.1.0"
