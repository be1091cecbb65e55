"""How much memory the collect step takes to store a large output in an S3 bucket.

Starts moto's S3 server (a child process) and a stand-in for ComfyUI's `/view` serving one large PNG of noise,
then runs the real `collect_outputs` activity (outside Temporal) with STORAGE_PROVIDER=s3, and prints the peak
growth of the Python heap (tracemalloc) and of the process's resident memory while the file goes from /view to
a scratch file to the bucket, multipart.

    python bench/s3_memory.py [--megabytes 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
from aiohttp import web
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from temporalio.testing import ActivityEnvironment  # noqa: E402

from activities.comfy import ComfyActivities  # noqa: E402
from app.comfy.client import ComfyClient  # noqa: E402
from app.comfy.health import BackendHealth  # noqa: E402
from app.models import CollectOutputsInput, OutputFormat  # noqa: E402
from app.storage import S3Storage  # noqa: E402
from tests.harness import MotoServerProcess, serve_locally  # noqa: E402

MB = 1024 * 1024


def noise_png(path: Path, megabytes: int) -> None:
    """A PNG of uniform noise, which PNG cannot compress: about `megabytes` MB."""
    side = int((megabytes * MB / 3) ** 0.5) + 1
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(path, "PNG", compress_level=1)


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def main(megabytes: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        picture = root / "big.png"
        noise_png(picture, megabytes)
        view = web.Application()
        view.router.add_get("/view", lambda request: web.FileResponse(picture))
        store = MotoServerProcess(root)
        store.start()
        try:
            bucket = store.create_bucket()
            storage = S3Storage(bucket=bucket, endpoint_url=store.url, access_key="test", secret_key="test",
                                region="us-east-1")
            async with serve_locally(view) as url, httpx.AsyncClient() as http:
                comfy = ComfyClient(url, http, BackendHealth("bench", url))
                activities = ComfyActivities({"bench": comfy}, storage, engine=None, scratch_dir=root / "tmp")  # type: ignore[arg-type]
                request = CollectOutputsInput(
                    job_id="bench", backend="bench", timeout_seconds=60, output_format=OutputFormat.png,
                    outputs={"9": {"images": [{"filename": "big.png", "subfolder": "", "type": "output"}]}},
                )
                start_rss = peak_rss = resident_bytes()
                done = threading.Event()

                def sample() -> None:
                    nonlocal peak_rss
                    while not done.wait(0.005):
                        peak_rss = max(peak_rss, resident_bytes())

                sampler = threading.Thread(target=sample)
                sampler.start()
                tracemalloc.start()
                heap_start, _ = tracemalloc.get_traced_memory()
                started = time.perf_counter()
                [output] = (await ActivityEnvironment().run(activities.collect_outputs, request)).files
                seconds = time.perf_counter() - started
                _, heap_peak = tracemalloc.get_traced_memory()
                done.set()
                sampler.join()
                tracemalloc.stop()
        finally:
            store.kill()
    print(f"stored {output.size / MB:.1f} MB in {seconds:.2f} s ({output.size / MB / seconds:.0f} MB/s) as "
          f"{output.storage_key}")
    print(f"Python heap peak: +{(heap_peak - heap_start) / MB:.1f} MB; resident memory peak: "
          f"+{(peak_rss - start_rss) / MB:.1f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=50)
    asyncio.run(main(parser.parse_args().megabytes))
