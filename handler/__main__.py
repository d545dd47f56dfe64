"""`python -m handler`: load the pipeline once, then serve RunPod jobs, RUNPOD_CONCURRENCY at a time.

The runpod SDK reads its own flags from sys.argv (`--rp_serve_api`, `--test_input`, ...).

The SDK sends its heartbeat from a `multiprocessing.Process` it starts after this process has loaded
the pipeline. Forked, that process would hold a copy-on-write snapshot of this one's memory: every
page this process frees and reuses afterwards (PyTorch's and glibc's heaps) is duplicated for a
process that only sends a ping, and a worker killed by the out-of-memory killer leaves it behind,
holding all of it. So it is spawned: a fresh interpreter that imports this module's top level, which
is kept to the standard library and runpod for that reason (the rest is imported in `main`).
"""

import logging
import multiprocessing

import runpod


def main() -> None:
    from handler.worker import make_handler
    from inference.pipeline import DeviceUnavailable
    from inference.service import InferenceService
    from inference.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = InferenceService(Settings())
    try:
        service.load()  # at worker start, not per job
    except DeviceUnavailable as exc:  # exit within seconds, saying why: RunPod marks the worker unhealthy
        raise SystemExit(f"sdxl-lora worker not started: {exc}") from None
    concurrency = service.settings.runpod_concurrency  # the SDK takes this many jobs at once (job-take-batch)
    multiprocessing.set_start_method("spawn", force=True)
    runpod.serverless.start({"handler": make_handler(service), "concurrency_modifier": lambda current: concurrency})


if __name__ == "__main__":
    main()
