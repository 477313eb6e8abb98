"""Benchmarks run by ``moe-kernels bench ...`` (GPU; CUDA-event timing, tables, plots)."""
