"""`python benchmarks/throughput.py ARGS` is `tokenmill bench throughput ARGS`: tokenmill/benchmarks/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tokenmill, installed or not

from tokenmill.benchmarks.throughput import main

if __name__ == "__main__":
    sys.exit(main())
