"""GPU kernels (Triton) and their torch paths for the query path of chunkcache.

Each kernel folder holds a readable fp32 reference, the torch path and the Triton kernel with its
launcher; `ops.py` is the front door that checks inputs and dispatches (see `backend.py`).
"""

from .backend import get_backend, set_backend, use_backend
from .ops import position_causal_attention, rerotate_keys, scatter_rows, select_tokens, token_deviation

__all__ = [
    "get_backend",
    "position_causal_attention",
    "rerotate_keys",
    "scatter_rows",
    "select_tokens",
    "set_backend",
    "token_deviation",
    "use_backend",
]
