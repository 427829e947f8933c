"""onecomp-plugin-jointq: joint local search over integer codes and group scales, from GPTQ."""
__version__ = "0.2.0"
