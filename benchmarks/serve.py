"""`python benchmarks/serve.py ARGS` is `tokenmill bench serve ARGS` (tokenmill/benchmarks/serve.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tokenmill, installed or not

from tokenmill.benchmarks.serve import main

if __name__ == "__main__":
    sys.exit(main())
