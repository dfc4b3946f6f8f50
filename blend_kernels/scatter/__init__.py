"""Row scatter of recomputed K/V into the request cache: reference.py, torch_impl.py, kernel.py (Triton)."""
