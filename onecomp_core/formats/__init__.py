"""Quantized formats: representation, packing, inference module, save/load, exports."""
