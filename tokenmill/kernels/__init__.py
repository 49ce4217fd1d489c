"""Our kernels: C sources for CPUs, built on first use with the system compiler (cpu.py), and Triton
kernels for the layers' small ops on GPUs (gpu.py)."""
