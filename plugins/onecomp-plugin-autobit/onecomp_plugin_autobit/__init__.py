"""onecomp-plugin-autobit: per-module bit widths and group sizes chosen by an integer program."""
__version__ = "0.2.0"
