"""Model adapters: what the scheduler needs to know about an architecture."""
from .base import ModelAdapter, find_adapter
from .decoder import DecoderAdapter

__all__ = ["ModelAdapter", "DecoderAdapter", "find_adapter"]
