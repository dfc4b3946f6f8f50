"""RoPE re-rotation of cached keys: reference.py (naive fp32), torch_impl.py (CPU path), kernel.py (Triton)."""
