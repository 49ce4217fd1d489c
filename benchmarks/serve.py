"""`python benchmarks/serve.py ARGS` is `tokenmill bench serve ARGS` (tokenmill/benchmarks/serve.py)."""

import sys

from tokenmill.benchmarks.serve import main

if __name__ == "__main__":
    sys.exit(main())
