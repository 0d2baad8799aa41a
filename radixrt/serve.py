"""`python -m radixrt.serve [--model PATH] ...`: same as `radixrt serve`."""

from __future__ import annotations

import sys

from radixrt.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
