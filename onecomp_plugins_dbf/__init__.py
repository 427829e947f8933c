"""onecomp-plugins-dbf: binary-factor formats for 1-2 bits per weight."""
__version__ = "0.1.0"
