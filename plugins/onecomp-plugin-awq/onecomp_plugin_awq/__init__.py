"""onecomp preprocessor ``awq``: activation-aware per-input-channel scaling (docs/algorithms.md#awq)."""
