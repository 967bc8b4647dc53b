"""Measure: params, FLOPs, latency, accuracy and their sampling error; the block analysis."""
