"""onecomp's GGUF exporter (``--export gguf``)."""
