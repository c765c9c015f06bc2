"""Fixed cost per command: how long `fastpath` takes before it does any work (issue 17 goal:
<= 0.15 s per command on this kind of machine).

Measured in one run, median of --repeat runs each, all with the same interpreter:
    python -c pass                       the interpreter alone (baseline)
    fastpath --help                      interpreter + building the parser (every command module)
    fastpath list REPO                   a real command on an empty local repository
    fastpath show REPO latest            a command that fails at once (no restore point)
    fastpath-agent --help                the agent's CLI (dom0 side)
Printed: seconds, and the cost above the bare interpreter. The heavy imports that make this
cost (numpy, boto3, libnbd, XenAPI...) are kept lazy; tests/test_lazy_imports.py checks which
stay unloaded, this script only measures.

    .venv/bin/python -m bench.startup              # 15 repeats
    .venv/bin/python -m bench.startup --json
    .venv/bin/python -X importtime -m orchestrator.cli --help 2>&1 | sort -t'|' -k2 -n | tail
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

GOAL = 0.15


def median_seconds(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(repeat: int) -> dict:
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="fastpath-startup-") as tmp:
        repo = os.path.join(tmp, "repo")
        subprocess.run(
            [py, "-m", "orchestrator.cli", "repo", "init", repo],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cases = {
            "python -c pass": [py, "-c", "pass"],
            "fastpath --help": [py, "-m", "orchestrator.cli", "--help"],
            "fastpath list REPO": [py, "-m", "orchestrator.cli", "list", repo],
            "fastpath show REPO latest": [py, "-m", "orchestrator.cli", "show", repo, "latest"],
            "fastpath-agent --help": [py, "-m", "agent", "--help"],
        }
        seconds = {name: median_seconds(cmd, repeat) for name, cmd in cases.items()}
    base = seconds["python -c pass"]
    rows = [
        {
            "command": name,
            "seconds": round(s, 4),
            "above_interpreter": round(s - base, 4),
            "goal_seconds": None if name == "python -c pass" else GOAL,
            "met": None if name == "python -c pass" else s <= GOAL,
        }
        for name, s in seconds.items()
    ]
    return {"repeat": repeat, "goal": f"fixed cost per command <= {GOAL} s", "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = run(args.repeat)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['goal']} (median of {args.repeat} runs)")
    for r in result["rows"]:
        met = "" if r["met"] is None else ("  met" if r["met"] else "  NOT met")
        print(f"  {r['command']:<28} {r['seconds']:.3f} s  (+{r['above_interpreter']:.3f}){met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
