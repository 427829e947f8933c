"""onecomp preprocessor ``hadamard``: fold every RMSNorm into the linears that read it, then
rotate the residual stream (R1) and each attention head's value/output pair (R2) by randomised
Hadamard matrices, all fused into the weights (docs/algorithms.md#hadamard)."""
