"""onecomp-plugin-lpcd: submodule coordinate descent (a correction and a block refiner)."""
__version__ = "0.2.0"
