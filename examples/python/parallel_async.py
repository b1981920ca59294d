"""Run the same job in several StacyVM sandboxes at once with the asyncio
client, and collect the results.

    STACYVM_URL=http://127.0.0.1:7070 STACYVM_API_KEY=svm_... python examples/python/parallel_async.py

STACYVM_IMAGE picks the image (default: busybox).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Tuple

import stacyvm


async def run_one(client: stacyvm.AsyncClient, image: str, n: int) -> Tuple[int, str]:
    async with client.sandbox(image=image, labels={"example": "parallel_async", "n": str(n)}) as sb:
        await sb.files.write("/work/n", str(n))
        r = await sb.exec(["sh", "-c", "n=$(cat /work/n); echo $((n * n))"])
        if not r.ok:
            raise RuntimeError(f"sandbox {sb.id}: exit {r.exit_code}: {r.stderr}")
        return n, r.stdout.strip()


async def main() -> int:
    image = os.environ.get("STACYVM_IMAGE", "busybox")
    async with stacyvm.AsyncClient() as client:
        results = await asyncio.gather(*(run_one(client, image, n) for n in range(1, 5)))
    for n, square in results:
        print(f"{n}^2 = {square}")
    return 0 if all(int(sq) == n * n for n, sq in results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
