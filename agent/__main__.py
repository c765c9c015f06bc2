"""`python3 -m agent ...` is `fastpath-agent ...` (dom0 has no entry-point scripts without pip)."""

import sys

from agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
