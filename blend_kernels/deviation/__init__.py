"""Per-token KV deviation (CacheBlend's selection score): reference.py, torch_impl.py, kernel.py (Triton)."""
