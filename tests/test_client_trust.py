"""The client trusts no answer it has not checked (issue 30).

A stand-in service on 127.0.0.1 answers every request with a well-shaped 200 that is wrong in one
way: each must end `invalid_answer`, the original reference kept, nothing charged. The image
checks are compared with Pillow, an independent decoder (the client itself may not import it).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from sdxl_lora_client import (
    ClipPrompt, EnhanceOptions, LoraApplicator, ReplicateClient, ServiceBackend, SqlStore,
)
from sdxl_lora_client.compat import load_matrix
from sdxl_lora_client.image_headers import NotAnImage, read_image_info
from sdxl_lora_client.testing import TINY_PNG, TINY_PNG_BASE64, FakeReplicate, answer_for

SHA = "ab" * 32
REF = "https://cdn.example/face-{}.png"
Corrupt = Callable[[dict, dict], None]  # (the request's JSON, the answer's JSON) -> edits the answer


def _without_base64(request: dict, answer: dict) -> None:
    del answer["images"][0]["base64"]


def _not_base64(request: dict, answer: dict) -> None:
    answer["images"][0]["base64"] = "this is not base64 !!"


def _wrong_sha256(request: dict, answer: dict) -> None:
    answer["images"][0]["sha256"] = "0" * 64


def _html_labelled_png(request: dict, answer: dict) -> None:
    html = b"<html><body>502 Bad Gateway</body></html>"
    answer["images"][0].update(base64=base64.b64encode(html).decode(), sha256=hashlib.sha256(html).hexdigest())


def _one_seed_for_all(request: dict, answer: dict) -> None:
    answer["images"][0]["seed"] = 12345


def _no_loras(request: dict, answer: dict) -> None:
    answer["loras"] = []


def _another_lora(request: dict, answer: dict) -> None:
    answer["loras"] = [{"id": "someone-else", "sha256": "cd" * 32, "source": "disk"}]


def _right_id_other_sha256(request: dict, answer: dict) -> None:
    answer["loras"][0]["sha256"] = "cd" * 32


def _wrong_size(request: dict, answer: dict) -> None:  # labelled as asked, the bytes are 1x1
    answer["images"][0].update(base64=TINY_PNG_BASE64, sha256=hashlib.sha256(TINY_PNG).hexdigest())


BAD = {"base64 missing": _without_base64, "base64 not base64": _not_base64, "sha256 wrong": _wrong_sha256,
       "html labelled image/png": _html_labelled_png, "one seed for every clip": _one_seed_for_all,
       "loras empty": _no_loras, "loras another lora": _another_lora, "loras other sha256": _right_id_other_sha256}


class StandIn:
    """POST /v1/generate answers `answer_for(request)` edited by `corrupt`; with url delivery the
    image is served at GET /img/N (`served` replaces its bytes when set)."""

    def __init__(self, corrupt: Corrupt | None = None, served: bytes | None = None):
        self.corrupt, self.served = corrupt, served
        self.images: list[bytes] = []
        self.requests: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> StandIn:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, request: dict) -> dict:
        self.requests.append(request)
        answer = answer_for(request)
        if request.get("output", {}).get("delivery") == "url":
            image = answer["images"][0]
            self.images.append(self.served or base64.b64decode(image.pop("base64")))
            image["url"] = f"{self.url}/img/{len(self.images) - 1}"
        if self.corrupt is not None:
            self.corrupt(request, answer)
        return answer

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["content-length"])))
                self.send(json.dumps(stand_in.answer(request)).encode(), "application/json")

            def do_GET(self):
                self.send(stand_in.images[int(self.path.rsplit("/", 1)[1])], "image/png")

        return Handler


@pytest.fixture
def store(tmp_path) -> SqlStore:
    store = SqlStore(f"sqlite:///{tmp_path / 'video.db'}")
    store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors", sha256=SHA)
    return store


def clips(count: int = 2) -> list[ClipPrompt]:
    return [ClipPrompt(f"c{i}", f"shot {i}", [REF.format(i)]) for i in range(count)]


def apply(store, base: str, options: EnhanceOptions | None = None, **kwargs):
    with LoraApplicator(store=store, preprocessing=ServiceBackend(base), options=options, sleep=lambda s: None,
                        **kwargs) as applicator:
        return applicator.apply("job", clips(), "kling_v21", "char")


def assert_nothing_used_or_charged(store, result) -> None:
    assert result.path == "reference_fallback" and result.clips == clips(), "the original references kept"
    assert [(o.status, o.reason, o.cost) for o in result.outcomes] == [("original", "invalid_answer", 0)] * 2
    assert store.job_costs("job") == [] and store.total_cost("job") == 0, "nothing charged"


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_wrong_answer_is_invalid_kept_out_and_not_charged(store, bad):
    with StandIn(BAD[bad]) as service:
        result = apply(store, service.url, max_concurrent_clips=1)
    assert_nothing_used_or_charged(store, result)
    assert len(service.requests) == 4, "retried like any invalid answer (2, 4, 8 s), then the job gave up"


def test_an_image_of_another_size_than_asked_is_invalid(store):
    with StandIn(_wrong_size) as service:
        result = apply(store, service.url, EnhanceOptions(width=64, height=64))
    assert_nothing_used_or_charged(store, result)


def test_a_good_answer_passes_every_check(store):
    with StandIn() as service:
        result = apply(store, service.url, EnhanceOptions(width=64, height=72))
    assert [o.status for o in result.outcomes] == ["enhanced"] * 2
    data = base64.b64decode(result.clips[0].character_reference_urls[0].split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).size == (64, 72)
    assert len(store.job_costs("job")) == 2


def test_url_delivery_is_fetched_hashed_and_compared(store):
    with StandIn() as service:
        good = apply(store, service.url, EnhanceOptions(delivery="url"))
    assert [o.status for o in good.outcomes] == ["enhanced"] * 2
    assert good.clips[0].character_reference_urls[0].startswith(service.url + "/img/")
    with StandIn(served=b"<html>expired link</html>") as service:
        store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors", sha256=SHA)
        bad = LoraApplicator(store=store, preprocessing=ServiceBackend(service.url), sleep=lambda s: None,
                             options=EnhanceOptions(delivery="url")).apply("job-2", clips(), "kling_v21", "char")
    assert [(o.status, o.reason) for o in bad.outcomes] == [("original", "invalid_answer")] * 2
    assert bad.clips == clips() and store.job_costs("job-2") == []


def test_a_replicate_prediction_without_output_is_not_charged_and_the_direct_path_says_so(store):
    store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors", sha256=SHA,
                   direct_weights={"kling": "https://weights.example/kling.safetensors"})
    matrix = load_matrix()
    matrix["kling_v21"] = type(matrix["kling_v21"])(**{**matrix["kling_v21"].__dict__,
                                                       "direct_lora_supported": True, "lora_field": "lora_weights"})
    with FakeReplicate() as fake, StandIn() as service:
        fake.script = ["no_output", "no_output"]
        replicate = ReplicateClient("token", base_url=fake.url, poll_interval_s=0.01)
        with LoraApplicator(store=store, preprocessing=ServiceBackend(service.url), replicate=replicate,
                            matrix=matrix, sleep=lambda s: None) as applicator:
            result = applicator.apply("job", clips(1), "kling_v21", "char")
    [outcome] = result.outcomes
    assert (outcome.status, outcome.reason) == ("enhanced", "direct_failed"), "preprocessed instead, and said"
    [warning] = result.warnings
    assert "direct LoRA path failed" in warning and "invalid_answer" in warning
    assert [r["api_name"] for r in store.job_costs("job")] == ["sdxl_lora_preprocessing"], "no direct charge"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_header_reader_agrees_with_pillow(fmt, mode):
    buffer = io.BytesIO()
    Image.new(mode, (37, 21), 90).save(buffer, format=fmt)
    data = buffer.getvalue()
    info = read_image_info(data)
    reference = Image.open(io.BytesIO(data))
    assert (info.mime, info.width, info.height) == (reference.get_format_mimetype(), *reference.size)
    with pytest.raises(NotAnImage):
        read_image_info(data[: len(data) - 9])  # truncated
