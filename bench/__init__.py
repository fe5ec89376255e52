"""Benchmarks of qadapter-kernels: timing and peak-memory measurement, baselines and reports."""
