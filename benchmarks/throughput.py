"""`python benchmarks/throughput.py ARGS` is `tokenmill bench throughput ARGS`: tokenmill/benchmarks/."""

import sys

from tokenmill.benchmarks.throughput import main

if __name__ == "__main__":
    sys.exit(main())
