"""``python -m bench.fleet``: the dedup and storage report on a fleet built from one template.

The report is the package's (orchestrator/benchcmd/fleet.py, also ``fastpath bench --fleet``);
this script only runs it from the source tree with the same options:

    .venv/bin/python -m bench.fleet                       # 10 VMs x 30 days, 64 MiB disks
    .venv/bin/python -m bench.fleet --quick               # 3 VMs x 3 days, 8 MiB disks
    .venv/bin/python -m bench.fleet --vms 20 --days 60 --size 256M --json
"""

from __future__ import annotations

import sys

from orchestrator.benchcmd.fleet import main

if __name__ == "__main__":
    sys.exit(main())
