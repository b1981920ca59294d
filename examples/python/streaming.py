"""Stream a command's output from a StacyVM sandbox as it is produced, then
report how it ended.

    STACYVM_URL=http://127.0.0.1:7070 STACYVM_API_KEY=svm_... python examples/python/streaming.py

STACYVM_IMAGE picks the image (default: busybox).
"""

from __future__ import annotations

import os
import sys
import time

import stacyvm

# A build-like job: progress on stdout, a warning on stderr, output over time.
JOB = """
for step in 1 2 3 4 5; do
  echo "step $step/5: working"
  if [ "$step" = 3 ]; then echo "warning: step 3 was slow" >&2; fi
  sleep 0.3
done
echo "done"
"""


def main() -> int:
    image = os.environ.get("STACYVM_IMAGE", "busybox")
    client = stacyvm.Client()
    with client.sandbox(image=image, labels={"example": "streaming"}) as sb:
        started = time.monotonic()
        lines = 0
        with sb.exec_stream(["sh", "-c", JOB], timeout_s=60) as stream:
            for chunk in stream:
                elapsed = time.monotonic() - started
                target = sys.stdout if chunk.stream == "stdout" else sys.stderr
                for line in chunk.text.splitlines():
                    print(f"[{elapsed:5.2f}s {chunk.stream}] {line}", file=target, flush=True)
                    lines += 1
            status = stream.exit
        assert status is not None, "a stream that ends normally always reports the exit"
        print(f"exit code {status.exit_code} after {status.duration_ms} ms ({lines} lines streamed)")
        return 0 if status.ok else 1


if __name__ == "__main__":
    sys.exit(main())
