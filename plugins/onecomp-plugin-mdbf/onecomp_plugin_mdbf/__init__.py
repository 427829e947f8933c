"""onecomp-plugin-mdbf: multi-envelope double binary factorisation (MDBF)."""
__version__ = "0.2.0"
