"""The thin client the video generator calls: no torch, no diffusers, no fastapi."""

from client.applicator import ApplyResult, ClipPrompt, EnhanceOptions, LoraApplicator, Pricing
from client.backends import BackendError, RunPodBackend, ServiceBackend
from client.compat import VideoModel, load_matrix
from client.replicate import ReplicateClient
from client.store import LoraRecord, SqlStore

__all__ = [
    "ApplyResult", "BackendError", "ClipPrompt", "EnhanceOptions", "LoraApplicator", "LoraRecord", "Pricing",
    "ReplicateClient", "RunPodBackend", "ServiceBackend", "SqlStore", "VideoModel", "load_matrix",
]
