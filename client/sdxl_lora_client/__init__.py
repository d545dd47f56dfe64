"""The video generator's side of sdxl-lora-service: no torch, no diffusers, no fastapi.

`LoraApplicator` / `AsyncLoraApplicator` apply a character LoRA to a video job; `contract` holds
the service's request/response models and error codes.
"""

from sdxl_lora_client.applicator import (
    ApplyResult, AsyncLoraApplicator, ClipPrompt, EnhanceOptions, LoraApplicator, Pricing,
)
from sdxl_lora_client.backends import BackendError, RunPodBackend, ServiceBackend
from sdxl_lora_client.compat import VideoModel, load_matrix
from sdxl_lora_client.contract import ErrorCode, GenerateRequest, GenerateResponse
from sdxl_lora_client.replicate import ReplicateClient
from sdxl_lora_client.store import LoraRecord, SqlStore

__all__ = [
    "ApplyResult", "AsyncLoraApplicator", "BackendError", "ClipPrompt", "EnhanceOptions", "ErrorCode",
    "GenerateRequest", "GenerateResponse", "LoraApplicator", "LoraRecord", "Pricing", "ReplicateClient",
    "RunPodBackend", "ServiceBackend", "SqlStore", "VideoModel", "load_matrix",
]
