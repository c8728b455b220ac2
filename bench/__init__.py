"""Benchmarks, run by hand (make bench): latency, capacity, gateway load."""
