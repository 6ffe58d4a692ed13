"""Benchmark harness of the Image Service: `make bench` runs `bench/run.py`."""
