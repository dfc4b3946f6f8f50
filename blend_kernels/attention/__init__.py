"""Position-causal attention for selected queries: reference.py (naive fp32), torch_impl.py (blocked
SDPA, the CPU production path), kernel.py (Triton flash-style kernel)."""
