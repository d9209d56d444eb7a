"""perf_analyzer recipe for the asyncdiff model (see run_perf.py)."""
