"""Benchmarks of chunkcache (python -m bench.<name>)."""
import chunkcache.openmp  # noqa: F401  (before anything loads torch: chunkcache/openmp.py)
