"""`tokenmill bench`: the offline throughput workload and the serving load, as vLLM's `vllm bench`.

`benchmarks/throughput.py` and `benchmarks/serve.py` in the repository run the same code.
"""
