"""The FastAPI service over real HTTP on loopback, with LoRAs served by a local file server."""

from __future__ import annotations

import base64
import hashlib
import io
import pickle
import re
import threading

import httpx
import pytest
from PIL import Image

from api.app import create_app
from inference.service import InferenceService
from inference.settings import Settings
from tests.fakes import LiveServer, wait_ready
from tests.servers import FileServer

API_KEY = "test-key"


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("served")
    for name, seed in (("a", 1), ("b", 2)):
        (root / f"{name}.safetensors").write_bytes(make_lora(seed=seed, text_encoders=(name == "a")).read_bytes())
    (root / "garbage.safetensors").write_bytes(b"\x00garbage" * 100)
    (root / "pickle.safetensors").write_bytes(pickle.dumps({"unet.x.lora_A.weight": [1, 2, 3]}))
    Image.new("RGB", (72, 56), (200, 30, 30)).save(root / "ref.png")
    with FileServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_model):
    return Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path_factory.mktemp("cache"),
                    allow_private_urls=True, api_key=API_KEY, queue_max=2, max_resident_adapters=2,
                    max_image_bytes=1 << 20)


@pytest.fixture(scope="module")
def service_url(settings):
    with LiveServer(create_app(settings)) as base:
        wait_ready(base)
        yield base


def post(base: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/v1/generate", json=body, headers=headers, timeout=120)


def request(lora_server, *names, **extra) -> dict:
    body = {"prompt": "a character portrait", "num_inference_steps": 3, "width": 64, "height": 64, "seed": 11,
            "loras": [{"id": f"id-{n}", "url": lora_server.url(f"{n}.safetensors")} for n in names]}
    body.update(extra)
    return body


def image_bytes(response: httpx.Response) -> bytes:
    return base64.b64decode(response.json()["images"][0]["base64"])


def test_a_b_a_over_http_is_bit_identical_and_reports_resident(service_url, lora_server):
    a1 = post(service_url, request(lora_server, "a"))
    assert a1.status_code == 200, a1.text
    b = post(service_url, request(lora_server, "b"))
    a2 = post(service_url, request(lora_server, "a"))
    assert image_bytes(a1) == image_bytes(a2) != image_bytes(b)
    assert a2.json()["loras"][0]["source"] == "resident"
    assert a1.json()["loras"][0]["source"] in ("download", "disk")
    image = a1.json()["images"][0]
    assert image["sha256"] == hashlib.sha256(image_bytes(a1)).hexdigest()
    assert (image["width"], image["height"], image["mime"], image["seed"]) == (64, 64, "image/png", 11)
    plain = post(service_url, request(lora_server))
    assert plain.json()["loras"] == [] and image_bytes(plain) != image_bytes(a1)


BAD_INPUTS = {
    "width_63": (lambda s: request(s, width=63), 422, "invalid_request"),
    "steps_0": (lambda s: request(s, num_inference_steps=0), 422, "invalid_request"),
    # int(1 * 0.6) = 0 img2img steps: diffusers crashed on it (a 500) before the schema refused it
    "img2img_zero_steps": (lambda s: request(s, image=s.url("ref.png"), num_inference_steps=1, strength=0.6), 422,
                           "invalid_request"),
    "missing_prompt": (lambda s: {k: v for k, v in request(s).items() if k != "prompt"}, 422, "invalid_request"),
    "lora_404": (lambda s: request(s, loras=[{"id": "nope", "url": s.url("missing.safetensors")}]), 424, "lora_download_failed"),
    "lora_garbage": (lambda s: request(s, loras=[{"id": "g", "url": s.url("garbage.safetensors")}]), 422, "lora_invalid"),
    "lora_pickle": (lambda s: request(s, loras=[{"id": "p", "url": s.url("pickle.safetensors")}]), 422, "lora_invalid"),
    "wrong_sha256": (lambda s: request(s, loras=[{"id": "w", "url": s.url("a.safetensors"), "sha256": "0" * 64}]), 422, "lora_invalid"),
    "undecodable_image": (lambda s: request(s, image="data:image/png;base64," + base64.b64encode(b"not an image").decode()), 422, "image_invalid"),
    "oversize_image": (lambda s: request(s, image="data:image/png;base64," + "A" * (2 * 1024 * 1024)), 422, "image_invalid"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_its_code_and_the_next_good_request_is_unchanged(service_url, lora_server, case):
    good = request(lora_server, "a")
    before = image_bytes(post(service_url, good))
    build, status, code = BAD_INPUTS[case]
    response = post(service_url, build(lora_server))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert image_bytes(post(service_url, good)) == before


def test_wrong_api_key_is_unauthorized(service_url, lora_server):
    for key in (None, "wrong"):
        response = post(service_url, request(lora_server), key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


def test_loopback_lora_refused_when_private_urls_are_off(tmp_path, tiny_model, lora_server):
    settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path / "cache", allow_private_urls=False)
    with LiveServer(create_app(settings)) as base:
        wait_ready(base)
        response = post(base, request(lora_server, "a"), key=None)
        image = post(base, request(lora_server, image=lora_server.url("ref.png")), key=None)
    assert response.status_code == 424 and response.json()["error"]["code"] == "lora_download_failed"
    assert image.status_code == 422 and image.json()["error"]["code"] == "image_invalid"
    assert list((tmp_path / "cache").glob("*.safetensors")) == []


def test_img2img_from_url_uses_the_reference_size(service_url, lora_server):
    response = post(service_url, request(lora_server, "a", image=lora_server.url("ref.png"), width=None, height=None))
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(image_bytes(response)))
    assert image.size == (72, 56)


def test_queue_overflow_answers_busy_and_loses_nothing(settings, lora_server):
    n = settings.queue_max + 5
    results: list[httpx.Response | Exception] = []
    lock = threading.Lock()
    with LiveServer(create_app(settings)) as base:
        wait_ready(base)

        def call(i: int) -> None:
            try:
                response = post(base, request(lora_server, num_inference_steps=20, seed=i))
            except Exception as exc:  # a lost request shows up here
                response = exc
            with lock:
                results.append(response)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    statuses = sorted(r.status_code for r in results if isinstance(r, httpx.Response))
    assert len(statuses) == n, results
    assert set(statuses) <= {200, 429}
    assert 200 in statuses and 429 in statuses
    busy = [r for r in results if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "busy" and int(r.headers["retry-after"]) >= 1 for r in busy)


def test_health_ready_metrics_adapters(service_url, lora_server):
    assert httpx.get(f"{service_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{service_url}/readyz").json()["model"]["device"] == "cpu"
    post(service_url, request(lora_server, "a"))
    metrics = httpx.get(f"{service_url}/metrics").text
    assert 'sdxl_lora_requests_total{code="",route="/v1/generate",status="200"}' in metrics
    assert 'sdxl_lora_phase_seconds_count{phase="inference"}' in metrics
    assert "sdxl_lora_adapter_requests_total" in metrics
    assert "sdxl_lora_queue_depth" in metrics
    assert float(re.search(r"^sdxl_lora_images_generated_total (\S+)$", metrics, re.M).group(1)) >= 1
    adapters = httpx.get(f"{service_url}/v1/adapters", headers={"authorization": f"Bearer {API_KEY}"}).json()
    assert len(adapters["resident"]) <= 2 and adapters["resident"][0]["id"] == "id-a"
    assert {entry["id"] for entry in adapters["disk"]} >= {"id-a"}


def test_readyz_is_503_until_the_pipeline_is_loaded(tiny_model, tmp_path):
    gate = threading.Event()

    class SlowService(InferenceService):
        def load(self):
            gate.wait(30)
            super().load()

    settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path)
    with LiveServer(create_app(settings, service=SlowService(settings))) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 503
        busy = post(base, {"prompt": "x"}, key=None)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "busy"
        gate.set()
        wait_ready(base)


def test_openapi_shows_the_real_schema(service_url):
    spec = httpx.get(f"{service_url}/openapi.json").json()
    body = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"prompt", "loras", "image", "strength", "width", "height", "num_inference_steps", "guidance_scale",
            "seed", "num_images", "output"} <= set(body)
    assert "422" in spec["paths"]["/v1/generate"]["post"]["responses"]


def test_url_delivery_uploads_to_s3_and_s3_down_is_upload_failed(tmp_path, tiny_model, lora_server, monkeypatch):
    from tests.servers import S3Server

    with S3Server(monkeypatch) as s3:
        s3.client().create_bucket(Bucket="renders")
        settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path / "cache",
                            allow_private_urls=True, s3_bucket="renders", s3_endpoint_url=s3.endpoint)
        with LiveServer(create_app(settings)) as base:
            wait_ready(base)
            url_body = request(lora_server, "a", output={"delivery": "url", "format": "webp"})
            response = post(base, url_body, key=None)
            assert response.status_code == 200, response.text
            image = response.json()["images"][0]
            assert "base64" not in image and image["mime"] == "image/webp"
            fetched = httpx.get(image["url"])
            assert fetched.status_code == 200
            assert hashlib.sha256(fetched.content).hexdigest() == image["sha256"]
            assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
            # a repeated Idempotency-Key gets the same URL back, and nothing more is uploaded
            keyed = [httpx.post(f"{base}/v1/generate", json=url_body, headers={"idempotency-key": "job-1/clip-1"},
                                timeout=120) for _ in range(2)]
            assert keyed[0].status_code == 200 and keyed[1].content == keyed[0].content
            keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="renders")["Contents"]]
            # two renders; with S3_BUCKET set the idempotency store keeps its record there too
            assert len([k for k in keys if "/idempotency/" not in k]) == 2, keys

    down = settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{s3.port}"})  # stopped above
    with LiveServer(create_app(down)) as base:
        wait_ready(base)
        response = post(base, request(lora_server, output={"delivery": "url"}), key=None)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upload_failed"
        assert post(base, request(lora_server), key=None).status_code == 200


def test_a_lora_evicted_by_another_worker_before_loading_is_fetched_again(tmp_path, tiny_model, lora_server):
    """A worker sharing the cache deletes the file right after our fetch: one refetch, then success."""
    from sdxl_lora_client.contract import GenerateRequest

    settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path / "cache", allow_private_urls=True)
    service = InferenceService(settings)
    service.load()
    fetch = service.store.fetch
    evicted = []

    def fetch_then_lose_it(*args, **kwargs):
        lora = fetch(*args, **kwargs)
        if not evicted:
            lora.path.unlink()  # as another process's LRU eviction would
            evicted.append(lora.path)
        return lora

    service.store.fetch = fetch_then_lose_it
    before = lora_server.hits["/b.safetensors"]
    response = service.generate(GenerateRequest(**request(lora_server, "b")))
    assert evicted and response.loras[0].source == "download"
    assert lora_server.hits["/b.safetensors"] == before + 2
    assert service.engine.adapters.injected_names() == {service.engine.adapters.resident()[0].name}


def test_img2img_images_carry_an_identity_score_when_configured(tmp_path, tiny_model, lora_server):
    from sdxl_lora_client.contract import GenerateRequest
    from inference.identity import IdentityScorer, write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path / "cache",
                        allow_private_urls=True, identity_model=str(clip))
    service = InferenceService(settings)
    service.load(identity_in_background=False)
    reference = (lora_server.root / "ref.png").read_bytes()
    data_uri = "data:image/png;base64," + base64.b64encode(reference).decode()
    response = service.generate(GenerateRequest(**request(lora_server, "a", image=data_uri, num_images=2,
                                                          width=None, height=None)))
    independent = IdentityScorer(str(clip))
    for image in response.images:
        enhanced = Image.open(io.BytesIO(base64.b64decode(image.base64)))
        assert image.identity_score == independent.score(Image.open(io.BytesIO(reference)), [enhanced])[0]
        assert image.identity_score < 1.0
    txt2img = service.generate(GenerateRequest(**request(lora_server, "a")))
    assert txt2img.images[0].identity_score is None  # no reference, no score


def test_a_missing_identity_model_never_keeps_the_service_from_serving(tmp_path, tiny_model, lora_server):
    settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path / "cache",
                        allow_private_urls=True, identity_model=str(tmp_path / "no-such-clip"))
    with LiveServer(create_app(settings)) as base:
        wait_ready(base)
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["identity"].startswith("failed:") and "identity_score" in ready["warnings"][0]
        data_uri = "data:image/png;base64," + base64.b64encode((lora_server.root / "ref.png").read_bytes()).decode()
        response = post(base, request(lora_server, "a", image=data_uri, width=None, height=None), key=None)
    assert response.status_code == 200, response.text
    assert "identity_score" not in response.json()["images"][0]


def test_an_unwritable_cache_volume_falls_back_and_says_so(tmp_path, tiny_model, monkeypatch):
    """A path that cannot be created stands in for a root-owned volume (root ignores permission bits,
    so the permission case itself is run by the image test, as the image's non-root user)."""
    volume = tmp_path / "volume"
    volume.write_text("not a directory")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=volume / "sdxl-lora" / "loras")
    service = InferenceService(settings)
    assert service.store.cache_dir == tmp_path / "home" / ".cache" / "sdxl-lora" / "loras"
    assert "not writable" in service.warnings[0] and "SDXL_LORA_LORA_CACHE_DIR" in service.warnings[0]
