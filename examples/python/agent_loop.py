"""An agent-style loop on StacyVM: write a script into a sandbox, run it,
read what it produced, and decide the next step from the observation.

The "planner" here is a small rule-based function so that the example runs
anywhere; in a real agent it is the model call that turns the history of
(action, observation) pairs into the next script. The loop around it — write,
run, observe, repeat, clean up — is the part that stays the same.

    STACYVM_URL=http://127.0.0.1:7070 STACYVM_API_KEY=svm_... python examples/python/agent_loop.py

STACYVM_IMAGE picks the image (default: busybox, which has sh and awk but no
Python).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List, Optional

import stacyvm

SALES_CSV = """region,units,price
north,12,2.50
south,7,4.00
east,20,1.25
west,3,10.00
"""

TASK = "Compute the total revenue (units * price) in /work/sales.csv and write it to /work/result.txt."


@dataclass
class Step:
    """One turn of the loop: the script the planner chose and what running it showed."""

    script: str
    exit_code: Optional[int]
    stdout: str
    stderr: str


def plan(history: List[Step]) -> Optional[str]:
    """The next script to run, or None when the task is done.

    The first attempt reaches for Python; if the sandbox has none (exit 127),
    the planner adapts and falls back to awk — the kind of correction an
    agent makes after reading an error.
    """
    if not history:
        return (
            "python3 -c \"import csv; rows = list(csv.DictReader(open('/work/sales.csv')));"
            " open('/work/result.txt', 'w').write('%.2f' % sum(int(r['units']) * float(r['price']) for r in rows))\""
        )
    last = history[-1]
    if last.exit_code == 127 or "not found" in last.stderr:
        return "awk -F, 'NR > 1 { total += $2 * $3 } END { printf \"%.2f\", total > \"/work/result.txt\" }' /work/sales.csv"
    if last.exit_code == 0:
        return None
    raise RuntimeError(f"the planner has no idea how to recover from: {last.stderr.strip()}")


def main() -> int:
    image = os.environ.get("STACYVM_IMAGE", "busybox")
    client = stacyvm.Client()
    print(f"task: {TASK}")
    with client.sandbox(image=image, labels={"example": "agent_loop"}, timeout_s=600) as sb:
        print(f"sandbox {sb.id} ({sb.info.provider}) is running")
        sb.files.write("/work/sales.csv", SALES_CSV)

        history: List[Step] = []
        for turn in range(1, 6):
            script = plan(history)
            if script is None:
                break
            # The action goes into a file first, as an agent's generated code
            # would, so it can be inspected or rerun later.
            path = f"/work/step{turn}.sh"
            sb.files.write(path, "#!/bin/sh\n" + script + "\n", mode=0o755)
            result = sb.exec([path], cwd="/work", timeout_s=30)
            history.append(Step(script, result.exit_code, result.stdout, result.stderr))
            print(f"turn {turn}: ran {path} -> exit {result.exit_code}")
            if result.stderr.strip():
                print(f"  observation (stderr): {result.stderr.strip()}")
        else:
            print("gave up after 5 turns", file=sys.stderr)
            return 1

        answer = sb.files.read_text("/work/result.txt").strip()
        produced = [e.name for e in sb.files.list("/work")]
        print(f"files in /work: {', '.join(produced)}")
    print(f"answer: total revenue = {answer}")
    expected = sum(int(r.split(",")[1]) * float(r.split(",")[2]) for r in SALES_CSV.strip().splitlines()[1:])
    if answer != f"{expected:.2f}":
        print(f"wrong answer: expected {expected:.2f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
