"""Prometheus metrics of one app instance (its own registry, so several apps can coexist in tests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from sdxl_lora_client.contract import GenerateResponse

PHASES = ("fetch", "adapter", "inference", "encode", "upload")
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdxl_lora_requests", "Requests by route, status and error code",
                                ["route", "status", "code"], registry=r)
        self.latency = Histogram("sdxl_lora_request_seconds", "Request latency by route", ["route"],
                                 buckets=PHASE_BUCKETS, registry=r)
        self.phase = Histogram("sdxl_lora_phase_seconds", "Time per generation phase", ["phase"],
                               buckets=PHASE_BUCKETS, registry=r)
        self.lora_source = Counter("sdxl_lora_adapter_requests", "LoRAs used, by where they were found",
                                   ["source"], registry=r)
        self.queue_depth = Gauge("sdxl_lora_queue_depth", "Requests waiting for the GPU", registry=r)
        self.interrupted = Counter("sdxl_lora_interrupted", "Requests stopped before they finished, by reason "
                                   "(timeout: past SDXL_LORA_REQUEST_TIMEOUT_S; disconnect: the client hung up)",
                                   ["reason"], registry=r)
        self.resident_adapters = Gauge("sdxl_lora_resident_adapters", "Adapters resident in the pipeline", registry=r)

    def count_renders(self, images_rendered: Callable[[], int]) -> None:
        """Export `images_rendered()` as sdxl_lora_images_generated_total, read at each scrape."""
        self.registry.register(_RenderedImages(images_rendered))

    def count_recompiles(self, recompiles: Callable[[], int]) -> None:
        """Export `recompiles()` (graphs compiled after the warm-up) as sdxl_lora_recompiles_total."""
        self.registry.register(_Recompiles(recompiles))

    def observe(self, response: GenerateResponse) -> None:
        timings = response.timings_ms
        for phase in PHASES:
            self.phase.labels(phase=phase).observe(getattr(timings, phase) / 1e3)
        for lora in response.loras:
            self.lora_source.labels(source=lora.source).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RenderedImages:
    """The images the pipeline rendered, as the inference service counts them where it renders: an
    answer replayed for a repeated idempotency key renders nothing and adds nothing."""

    def __init__(self, images_rendered: Callable[[], int]):
        self.images_rendered = images_rendered

    def collect(self):
        yield CounterMetricFamily("sdxl_lora_images_generated", "Images the pipeline rendered",
                                  value=self.images_rendered())


class _Recompiles:
    """Graphs torch compiled after the warm-up (COMPILE=on): 0 in a healthy worker; each new image
    size adds its compiles once."""

    def __init__(self, recompiles: Callable[[], int]):
        self.recompiles = recompiles

    def collect(self):
        yield CounterMetricFamily("sdxl_lora_recompiles", "Graphs compiled after the warm-up", value=self.recompiles())
