"""`drex-jax bench`: reproducible serving benchmarks (workloads, runs, quality, reports, scale mode)."""
