"""onecomp-plugin-example: the template a researcher copies to add an algorithm to onecomp."""
__version__ = "0.2.0"
