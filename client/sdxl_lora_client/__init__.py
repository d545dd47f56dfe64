"""The video generator's side of sdxl-lora-service: no torch, no diffusers, no fastapi.

`LoraApplicator` / `AsyncLoraApplicator` apply a character LoRA to a video job; `contract` holds
the service's request/response models and error codes; `testing` has fakes (a preprocessing
backend, a Replicate) for the video generator's own tests. Log messages go to the logger
`sdxl_lora_client` (with a NullHandler): one warning per reason a job's clips fell back for, each
attempt at INFO.

The names below load on first use (PEP 562), so the service can import `sdxl_lora_client.contract`
(pydantic only) without the applicator, its HTTP clients and SQLAlchemy.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import TYPE_CHECKING

# The logging HOWTO's rule for libraries: the application decides where records go.
logging.getLogger("sdxl_lora_client").addHandler(logging.NullHandler())

_EXPORTS = {
    "AsyncLoraApplicator": "applicator", "LoraApplicator": "applicator",
    "EnhanceOptions": "options", "Pricing": "options",
    "RunPodBackend": "backends", "ServiceBackend": "backends",
    "PreprocessingBackend": "preprocessing", "SyncPreprocessingBackend": "preprocessing",
    "VideoModel": "compat", "load_matrix": "compat",
    "ErrorCode": "contract", "GenerateRequest": "contract", "GenerateResponse": "contract", "ImageOut": "contract",
    "BackendError": "errors", "ClientCode": "errors", "ClientError": "errors", "LedgerError": "errors",
    "OptionsError": "errors", "ReplicateError": "errors",
    "ApplyResult": "outcomes", "ClipOutcome": "outcomes", "ClipPrompt": "outcomes", "PrefetchResult": "outcomes",
    "Prediction": "replicate", "ReplicateClient": "replicate",
    "Charge": "store", "LoraRecord": "store", "SqlStore": "store",
}
# A literal list, so type checkers see what is exported (mypy --strict's "does not explicitly export").
__all__ = [
    "ApplyResult", "AsyncLoraApplicator", "BackendError", "Charge", "ClientCode", "ClientError", "ClipOutcome",
    "ClipPrompt", "EnhanceOptions", "ErrorCode", "GenerateRequest", "GenerateResponse", "ImageOut", "LedgerError",
    "LoraApplicator", "LoraRecord", "OptionsError", "Prediction", "PrefetchResult", "PreprocessingBackend",
    "Pricing", "ReplicateClient", "ReplicateError", "RunPodBackend", "ServiceBackend", "SqlStore",
    "SyncPreprocessingBackend", "VideoModel", "load_matrix",
]

if TYPE_CHECKING:
    from sdxl_lora_client.applicator import AsyncLoraApplicator, LoraApplicator
    from sdxl_lora_client.backends import RunPodBackend, ServiceBackend
    from sdxl_lora_client.compat import VideoModel, load_matrix
    from sdxl_lora_client.contract import ErrorCode, GenerateRequest, GenerateResponse, ImageOut
    from sdxl_lora_client.errors import (
        BackendError, ClientCode, ClientError, LedgerError, OptionsError, ReplicateError,
    )
    from sdxl_lora_client.options import EnhanceOptions, Pricing
    from sdxl_lora_client.outcomes import ApplyResult, ClipOutcome, ClipPrompt, PrefetchResult
    from sdxl_lora_client.preprocessing import PreprocessingBackend, SyncPreprocessingBackend
    from sdxl_lora_client.replicate import Prediction, ReplicateClient
    from sdxl_lora_client.store import Charge, LoraRecord, SqlStore


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdxl_lora_client' has no attribute {name!r}")
    value = getattr(import_module(f"sdxl_lora_client.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
