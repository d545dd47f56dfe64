"""The client's identity check: an enhanced reference scored below `min_identity_score` is dropped.

Runs against a scripted backend (no service, no torch): what matters is what the applicator does
with the `identity_score` the service returns.
"""

from __future__ import annotations

import base64
import io
import json
from decimal import Decimal

import httpx
import pytest
from PIL import Image

from sdxl_lora_client.contract import GenerateRequest, GenerateResponse
from sdxl_lora_client import ClipPrompt, EnhanceOptions, LoraApplicator, ServiceBackend, SqlStore
from sdxl_lora_client.testing import answer_for

REF1, REF2, SCENE = "https://cdn.example/face.png", "https://cdn.example/face2.png", "https://cdn.example/scene.png"


def png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def response_json(score: float | None) -> dict:
    image = {"seed": 1, "width": 8, "height": 8, "mime": "image/png", "sha256": "0" * 64, "base64": png_base64()}
    if score is not None:
        image["identity_score"] = score
    return {"images": [image], "loras": [{"id": "char", "sha256": "1" * 64, "source": "disk"}],
            "model": {"id": "m", "dtype": "float32", "device": "cpu"},
            "timings_ms": {"adapter": 10.0, "inference": 90.0, "total": 120.0}}


class ScriptedBackend:
    """Answers clip i's request (told apart by its reference image) with identity score `scores[i]`
    (None = not computed); clips run side by side, so arrival order is not clip order."""

    def __init__(self, *scores: float | None):
        self.scores = dict(zip((clip.character_reference_urls[0] for clip in clips()), scores, strict=True))
        self.requests: list[GenerateRequest] = []

    def generate(self, request: GenerateRequest, idempotency_key: str | None = None) -> GenerateResponse:
        self.requests.append(request)
        answer = answer_for(request.model_dump(mode="json"))  # an answer the client's checks accept
        answer["images"][0]["identity_score"] = self.scores[request.image]
        return GenerateResponse.model_validate(answer)


@pytest.fixture
def store(tmp_path) -> SqlStore:
    store = SqlStore(f"sqlite:///{tmp_path / 'video.db'}")
    store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors", trigger="<s0>")
    return store


def clips() -> list[ClipPrompt]:
    return [ClipPrompt("c1", "walks in", [REF1, REF2], [SCENE]), ClipPrompt("c2", "turns around", [REF2], [])]


def apply(store, backend, minimum: float | None):
    applicator = LoraApplicator(store=store, preprocessing=backend, options=EnhanceOptions(min_identity_score=minimum),
                                sleep=lambda s: None)
    return applicator.apply("job", clips(), "kling_v21", "char")


def test_a_score_below_the_minimum_keeps_the_original_reference_and_says_so(store):
    result = apply(store, ScriptedBackend(0.41, 0.93), minimum=0.6)
    low, high = result.clips
    assert low.character_reference_urls == [REF1, REF2] and low.scene_reference_urls == [SCENE]
    assert high.character_reference_urls[0].startswith("data:image/png;base64,")
    assert result.path == "preprocessed", "one clip was still enhanced"
    [warning] = result.warnings
    assert "c1" in warning and "0.4100" in warning and "0.6" in warning and "original reference kept" in warning
    rows = store.job_costs("job")
    assert sorted((r["clip_id"], r["details"]["identity_score"], r["details"]["accepted"]) for r in rows) == [
        ("c1", 0.41, False), ("c2", 0.93, True)], "the rejected render was still paid for"
    assert store.total_cost("job") == Decimal("0.01")
    assert [(o.status, o.reason, o.cost) for o in result.outcomes] == [
        ("original", "identity_rejected", Decimal("0.005")), ("enhanced", None, Decimal("0.005"))]


def test_every_clip_below_the_minimum_is_a_reference_fallback(store):
    result = apply(store, ScriptedBackend(0.2, 0.59999), minimum=0.6)
    assert result.path == "reference_fallback"
    assert result.clips == clips()
    assert len(result.warnings) == 2 and all("below the minimum" in w for w in result.warnings)


def test_a_score_at_the_minimum_is_accepted(store):
    result = apply(store, ScriptedBackend(0.6, 1.0), minimum=0.6)
    assert result.path == "preprocessed" and result.warnings == []
    assert all(c.character_reference_urls[0].startswith("data:") for c in result.clips)


def test_without_a_minimum_a_low_score_is_only_recorded(store):
    result = apply(store, ScriptedBackend(0.05, None), minimum=None)
    assert result.path == "preprocessed" and result.warnings == []
    assert all(c.character_reference_urls[0].startswith("data:") for c in result.clips)
    assert {r["clip_id"]: r["details"]["identity_score"] for r in store.job_costs("job")} == {"c1": 0.05, "c2": None}


def test_no_score_from_the_service_proceeds_with_one_warning_per_job(store):
    result = apply(store, ScriptedBackend(None, None), minimum=0.6)
    assert result.path == "preprocessed"
    assert all(c.character_reference_urls[0].startswith("data:") for c in result.clips)
    [warning] = result.warnings
    assert "no identity score" in warning and "0.6" in warning


def test_the_service_backend_reads_identity_score_from_the_response():
    answers = iter([response_json(0.8731), response_json(None)])
    seen = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=next(answers))

    backend = ServiceBackend("http://svc", transport=httpx.MockTransport(reply))
    request = GenerateRequest(prompt="p", image=REF1)
    assert backend.generate(request).images[0].identity_score == 0.8731
    assert backend.generate(request).images[0].identity_score is None
    assert "identity_score" not in seen[0], "the request carries no identity field: the service decides"
