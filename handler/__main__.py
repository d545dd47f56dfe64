"""`python -m handler`: load the pipeline once, then serve RunPod jobs, RUNPOD_CONCURRENCY at a time.

The runpod SDK reads its own flags from sys.argv (`--rp_serve_api`, `--test_input`, ...).
"""

import logging

import runpod

from handler.worker import make_handler
from inference.pipeline import DeviceUnavailable
from inference.service import InferenceService
from inference.settings import Settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = InferenceService(Settings())
    try:
        service.load()  # at worker start, not per job
    except DeviceUnavailable as exc:  # exit within seconds, saying why: RunPod marks the worker unhealthy
        raise SystemExit(f"sdxl-lora worker not started: {exc}") from None
    concurrency = service.settings.runpod_concurrency  # the SDK takes this many jobs at once (job-take-batch)
    runpod.serverless.start({"handler": make_handler(service), "concurrency_modifier": lambda current: concurrency})


if __name__ == "__main__":
    main()
