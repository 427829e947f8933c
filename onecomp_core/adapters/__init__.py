"""Model adapters: what the scheduler needs to know about an architecture."""
from .base import ModelAdapter, ResidualLayout, find_adapter
from .decoder import DecoderAdapter

__all__ = ["ModelAdapter", "DecoderAdapter", "ResidualLayout", "find_adapter"]
