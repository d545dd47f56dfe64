"""Prefetch: LoRAs put into the disk cache ahead of their first request, in bounded memory.

A prefetch only needs each file verified in the disk cache. A download is hashed and its
safetensors header parsed as it streams to disk (`LoraStore`); a file that was cached already is
hashed again from disk, chunk by chunk (`verify_on_disk`), so a damaged entry is fetched anew.
Nothing is read into memory whole and nothing is prepared for the pipeline: a prefetch holds a few
chunks per file in flight (the prefetch pool's threads), whatever the files' size or count.

The answer says what the cache holds when it answers: a LoRA evicted meanwhile (the prefetch's
LoRAs together larger than the cache, or other downloads) and one larger than the whole cache
(the next download evicts it) are `failed`, never `cached`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout

from sdxl_lora_client.contract import PrefetchLora, PrefetchOutcome, PrefetchRequest, PrefetchResponse
from inference.deadline import Deadline, timed_out
from inference.errors import ErrorCode, ServiceError
from inference.integrity import CorruptEntry, verify_on_disk
from inference.lora_file import LoraFile
from inference.lora_store import LoraStore

log = logging.getLogger(__name__)

CACHE_SETTING = "SDXL_LORA_LORA_CACHE_MAX_BYTES"
Repair = Callable[[Callable[[], LoraFile]], LoraFile]


def prefetch_loras(store: LoraStore, request: PrefetchRequest, deadline: Deadline, *, pool: Executor,
                   repair: Repair) -> PrefetchResponse:
    """Each LoRA into the disk cache, side by side in `pool`, each through `repair` (the service's
    cache repair); one outcome per LoRA, in the request's order, once all have settled."""
    futures = [pool.submit(repair, functools.partial(fetch_verified, store, spec)) for spec in request.loras]
    settled = [_settle(spec, future, deadline) for spec, future in zip(request.loras, futures)]
    return PrefetchResponse(loras=[_as_cached_now(store, spec, result)
                                   for spec, result in zip(request.loras, settled)])


def fetch_verified(store: LoraStore, spec: PrefetchLora) -> LoraFile:
    """The LoRA in the disk cache: downloaded (verified on the way), or found there and hashed again."""
    lora = store.fetch(spec.id, spec.url, spec.sha256)
    if lora.source == "disk":
        try:
            for name in {lora.path.name, *lora.checksums}:
                verify_on_disk(lora.path.parent / name, lora.expected_sha256(lora.path.parent / name))
        except CorruptEntry as exc:
            exc.lora = lora  # the repair evicts it and fetches it again
            raise
    return lora


def _settle(spec: PrefetchLora, future: Future, deadline: Deadline) -> LoraFile | PrefetchOutcome:
    """The fetched LoRA, or its `failed` outcome. A download past the deadline goes on, to its own."""
    try:
        return future.result(timeout=max(0.0, deadline.remaining()))
    except FutureTimeout:
        error = timed_out(deadline, "while fetching the LoRAs; the download goes on and will be in the cache "
                                    "for a retry")
        return _failed(spec, error.code, error.message)
    except ServiceError as exc:
        return _failed(spec, exc.code, exc.message)
    except Exception as exc:  # one LoRA's unexpected failure is its own outcome, never the others'
        log.exception("prefetch of %r failed unexpectedly", spec.id)
        return _failed(spec, ErrorCode.INTERNAL, f"internal error ({type(exc).__name__})")


def _as_cached_now(store: LoraStore, spec: PrefetchLora, result: LoraFile | PrefetchOutcome) -> PrefetchOutcome:
    """`cached` only for a LoRA the cache holds now, and will keep past the next download."""
    if isinstance(result, PrefetchOutcome):
        return result
    lora, limit = result, store.max_cache_bytes
    if lora.size > limit:
        return _failed(spec, ErrorCode.LORA_DOWNLOAD_FAILED,
                       f"too large for the cache ({lora.size} bytes; {CACHE_SETTING} is {limit}): the next "
                       f"download evicts it", lora.sha256)
    if not lora.entry.exists():
        return _failed(spec, ErrorCode.LORA_DOWNLOAD_FAILED,
                       f"evicted from the cache before the prefetch answered: the cache ({CACHE_SETTING} is "
                       f"{limit} bytes) cannot hold all it was asked for", lora.sha256)
    return PrefetchOutcome(id=spec.id, sha256=lora.sha256, status="cached")


def _failed(spec: PrefetchLora, code: ErrorCode, message: str, sha256: str | None = None) -> PrefetchOutcome:
    expected = sha256 or (spec.sha256.lower() if spec.sha256 else None)
    return PrefetchOutcome(id=spec.id, sha256=expected, status="failed", code=code, message=message)
