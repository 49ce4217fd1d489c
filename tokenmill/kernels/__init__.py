"""Compiled CPU kernels: C sources built on first use with the system compiler (see cpu.py)."""
