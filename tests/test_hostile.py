"""Hostile input: generated requests against the OpenAPI schema, and mutated LoRA files.

* schemathesis drives the live service (real HTTP, the real tiny pipeline) from its own OpenAPI
  schema, valid and invalid bodies alike: no 5xx, every status, header and body as documented.
* Hypothesis mutates small real safetensors files (bytes flipped, cut, inserted; the header's
  length field and its JSON rewritten with hostile dtypes, shapes and offsets) and Replicate-style
  tar bundles, and feeds them to `validate_safetensors` and to the whole store fetch: the only
  failure allowed is ServiceError(lora_invalid), nothing is ever unpickled, no input hangs, and a
  failed fetch caches nothing.
* Plus the sizes no generator reaches by chance: huge JSON headers, header lengths up to 2**64-1,
  and a zip bomb (zip is never accepted, so it must be refused without being inflated).

Example counts are small by default (the suite runs on 2 cores); SDXL_LORA_FUZZ_EXAMPLES raises
them for a longer run. Each fuzz test prints its figures (inputs tried, outcomes).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import json
import os
import pickle
import socket
import struct
import time
import uuid
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from inference.errors import ErrorCode, ServiceError
from inference.integrity import validate_safetensors
from inference.lora_store import LoraStore

FUZZ_EXAMPLES = int(os.environ.get("SDXL_LORA_FUZZ_EXAMPLES", "300"))
API_EXAMPLES = int(os.environ.get("SDXL_LORA_API_EXAMPLES", "60"))
HANG_S = 10.0  # no single input may take longer than this (a hang, not a speed target)
API_KEY = "hostile-key"
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


# -- the schema, against the live service ------------------------------------------------------------

@pytest.fixture(scope="module", params=[API_KEY, None], ids=["with_key", "keyless"])
def api_base(request, tiny_model, tmp_path_factory):
    """The app over loopback with the real tiny pipeline, generation kept cheap (steps, size and
    image count capped inside the engine: the request and its validation are untouched), and every
    URL a generated request may hold kept on this machine: host names resolve to 127.0.0.1, which
    the SSRF guard refuses (private URLs off), and s3:// goes to a closed loopback port."""
    from api.app import create_app
    from inference import fetch
    from inference.pipeline import Engine
    from inference.service import InferenceService
    from inference.settings import Settings
    from tests.fakes import LiveServer, wait_ready
    from tests.servers import DUMMY_AWS_ENV

    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=2)
    generate = engine.generate

    def cheap(job, *args, **kwargs):
        return generate(dataclasses.replace(job, num_inference_steps=min(job.num_inference_steps, 2),
                                            width=64 if job.width else None, height=64 if job.height else None,
                                            num_images=min(job.num_images, 2)), *args, **kwargs)

    engine.generate = cheap
    with pytest.MonkeyPatch.context() as patch:
        for key, value in DUMMY_AWS_ENV.items():
            patch.setenv(key, value)
        patch.setattr(fetch, "resolve", lambda host, port: ["127.0.0.1"])
        settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path_factory.mktemp("cache"),
                            api_key=request.param, allow_private_urls=False, s3_endpoint_url="http://127.0.0.1:9",
                            download_timeout_s=2.0, queue_max=2)
        with LiveServer(create_app(settings, service=InferenceService(settings, engine=engine))) as base:
            wait_ready(base)
            yield base


@pytest.fixture(scope="module")
def api_schema(api_base):
    schemathesis = pytest.importorskip("schemathesis")
    return schemathesis.openapi.from_url(f"{api_base}/openapi.json")


API_CASES: collections.Counter = collections.Counter()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_generated_request_gets_a_documented_answer(api_schema, api_base, mode):
    """schemathesis' checks on cases generated from the schema (valid ones, then invalid ones), for
    every route: no 5xx; status codes, content types, headers and bodies as documented; invalid
    bodies refused and valid ones accepted. (Driven through Hypothesis directly: schemathesis'
    pytest plugin does not run under pytest 9.)"""
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    @settings(max_examples=API_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(api_schema.as_strategy(generation_mode=GenerationMode(mode)))
    def check(case):
        generate, prefetch = case.path == "/v1/generate", case.path == "/v1/loras/prefetch"
        # A schema-valid generate request may still fail on what the schema cannot know (the LoRA or
        # image behind a URL): checked below, more strictly than schemathesis' own acceptance check.
        headers = {"Authorization": f"Bearer {API_KEY}"}
        if generate and mode == "positive":  # a generated key seen before with another body is rightly refused
            headers["Idempotency-Key"] = uuid.uuid4().hex
        response = case.call_and_validate(headers=headers, timeout=120,
                                          excluded_checks=[positive_data_acceptance] if generate or prefetch else None)
        API_CASES[f"{mode} {case.method} {case.path} {response.status_code}"] += 1
        if prefetch and mode == "positive":  # every URL here is refused: each LoRA its own `failed` outcome
            if response.status_code == 200:
                assert {o["status"] for o in response.json()["loras"]} <= {"failed"}, response.text[:500]
            else:
                assert (response.status_code, response.json()["error"]["code"]) == (422, "invalid_request")
                assert rule_beyond_the_schema(case.body), response.text[:500]
        if generate and response.status_code != 200:
            assert response.json()["error"]["code"] in {code.value for code in ErrorCode}
        if generate and mode == "positive" and response.status_code != 200:
            code, message = response.json()["error"]["code"], response.json()["error"]["message"]
            broken_rules = rule_beyond_the_schema(case.body)
            if broken_rules:
                assert (response.status_code, code) == (422, "invalid_request"), response.text[:500]
                assert all(rule in message for rule in broken_rules), (broken_rules, message)
            else:  # never "invalid_request" for a body that fits the schema
                assert (response.status_code, code) in DEPENDENCY_FAILURES, response.text[:500]

    check()


# What a schema-valid generate request may still get: the LoRA or reference image behind its URLs
# cannot be fetched or read (every URL here is refused by the SSRF guard, or points nowhere).
DEPENDENCY_FAILURES = {(424, "lora_download_failed"), (422, "lora_invalid"), (422, "image_invalid")}


def _splits(url: str) -> bool:
    try:
        urlsplit(url).port
    except ValueError:
        return False
    return True


def rule_beyond_the_schema(body) -> list[str]:
    """The request rules JSON Schema does not carry: a body that fits the schema but breaks one of them
    is refused as invalid_request, saying why. Returns what the message must say, in the order the
    service checks: pydantic's field validators (all reported together), its model validator, then
    the service's own configuration."""
    from sdxl_lora_client.contract import MAX_SEED

    if not isinstance(body, dict):
        return []
    fields = []
    if isinstance(body.get("seed"), (int, float)) and int(body["seed"]) > MAX_SEED:
        fields.append("seed")  # a float the schema's float comparison lets through (2**63 rounds past MAX_SEED)
    ids = [lora.get("id") for lora in body.get("loras") or [] if isinstance(lora, dict)]
    if len(ids) != len(set(map(str, ids))):
        fields.append("each LoRA id may appear once per request")
    urls = [lora.get("url") for lora in body.get("loras") or [] if isinstance(lora, dict)]
    if any(isinstance(url, str) and "\x85" in url for url in urls):  # whitespace to pydantic's \s, not to ECMA's
        fields.append("String should match pattern")
    if any(isinstance(url, str) and not _splits(url) for url in urls):  # "http://[", a port past 65535
        fields.append("not a URL")
    if fields:
        return fields
    if (body.get("width") is None) != (body.get("height") is None):
        return ["give width and height together"]
    steps, strength = body.get("num_inference_steps", 30), body.get("strength", 0.6)
    if body.get("image") is not None and int(steps * strength) < 1:
        return ["less than one step"]
    if isinstance(body.get("output"), dict) and body["output"].get("delivery") == "url":
        return ["delivery 'url' needs SDXL_LORA_S3_BUCKET"]  # this service has no bucket configured
    return []


def raw_post(base: str, head: bytes, chunks=()) -> bytes:
    """Send a hand-made request (headers, then body chunks until the server stops reading); return the answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered and closed while we were still sending: expected
            pass
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
                head, _, body = answer.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")]
                if length and len(body) >= length[0]:  # one whole answer: the connection may stay open
                    break
        except OSError:
            pass
    return answer


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_huge_body_is_refused_not_read_into_memory(api_base, framing):
    """10 GB declared (answered before any body is read), or 66 MiB chunked with no length (cut off):
    the same answer either way (a chunked one said "There was an error parsing the body")."""
    from api.app import MAX_BODY_BYTES

    head = (b"POST /v1/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\n".encode())
    if framing == "content-length":
        answer = raw_post(api_base, head + b"Content-Length: 10000000000\r\n\r\n", [b'{"prompt": "'])
    else:
        piece = b"A" * (1 << 20)
        chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (MAX_BODY_BYTES // len(piece) + 1) + [b"0\r\n\r\n"]
        answer = raw_post(api_base, head + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 422"), answer[:300]
    assert b'"code":"invalid_request"' in answer
    assert b"the request body is larger than the %d bytes allowed" % MAX_BODY_BYTES in answer, answer[-300:]
    assert httpx.get(f"{api_base}/healthz").status_code == 200


@pytest.mark.parametrize("image", ["data:image/png;base64,AAAA", "data:image/jpeg;base64,/9j/4AAQ",
                                   "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"])
def test_an_undecodable_image_is_image_invalid_without_object_reprs(api_base, image):
    """Issue 22 item 4: PIL's message named the buffer (`<_io.BytesIO object at 0x7fe2…>`)."""
    response = httpx.post(f"{api_base}/v1/generate", json={"prompt": "p", "image": image},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code == 422 and response.json()["error"]["code"] == "image_invalid", response.text
    message = response.json()["error"]["message"]
    assert "object at 0x" not in message and "<" not in message and message.startswith("cannot decode the image")


def test_schemathesis_figures(api_base):
    """Runs after the schema test (file order): prints what it tried, and checks it tried something."""
    print(f"\nschemathesis: {sum(API_CASES.values())} cases, 0 failures: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(API_CASES.items())))
    assert sum(API_CASES.values()) > 0
    assert httpx.get(f"{api_base}/healthz").status_code == 200


# -- safetensors: mutated files -----------------------------------------------------------------------

KEYS = ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]


def small_lora(metadata: dict | None = None) -> bytes:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key in KEYS:
        tensors[f"{key}.lora_A.weight"] = torch.randn(2, 8, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.randn(8, 2, generator=gen).to(torch.float16)
    return save(tensors, metadata=metadata)


SEEDS = [small_lora(), small_lora({"format": "pt", "ss_network_dim": "2"})]


class Exploit:
    """A pickle whose loading would create a marker file."""

    marker = Path("/tmp/sdxl-lora-hostile-pwned")

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def join(header, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


ints = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]))
dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "", "f32", "X" * 300, "F4"])
json_values = st.recursive(st.none() | st.booleans() | ints | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=10)


@st.composite
def hostile_header(draw) -> bytes:
    """A real file whose JSON header is rewritten: fields dropped, retyped, or given hostile values."""
    header, body = split(draw(st.sampled_from(SEEDS)))
    for key in draw(st.lists(st.sampled_from(sorted(header)), max_size=3, unique=True)):
        entry = header[key]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "value", "metadata"]))
        if field == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(dtypes)
        elif field == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.lists(ints, max_size=5))
        elif field == "data_offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(st.lists(ints, max_size=3))
        elif field == "drop":
            del header[key]
        elif field == "value":
            header[key] = draw(json_values)
        else:
            header["__metadata__"] = draw(json_values)
    if draw(st.booleans()):
        header[draw(st.text(max_size=30))] = {"dtype": draw(dtypes), "shape": draw(st.lists(ints, max_size=3)),
                                              "data_offsets": draw(st.lists(ints, max_size=2))}
    body = body[:draw(st.integers(0, len(body)))] if draw(st.booleans()) else body
    length = draw(st.one_of(st.none(), ints.filter(lambda n: 0 <= n < 2**64)))
    return join(header, body, length)


@st.composite
def mutated_bytes(draw) -> bytes:
    """A real file with bytes flipped, cut out, inserted, or truncated."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "length"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position:position + draw(st.integers(1, 64))]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif action == "truncate":
            del data[position:]
        elif action == "length" and len(data) >= 8:
            data[:8] = struct.pack("<Q", draw(ints.filter(lambda n: 0 <= n < 2**64)))
    return bytes(data)


hostile_files = st.one_of(
    mutated_bytes(), hostile_header(),
    st.binary(max_size=512),
    st.builds(lambda b: b"\x80\x04" + b, st.binary(max_size=64)),  # pickle-like
    st.just(pickle.dumps(Exploit())), st.just(pickle.dumps(Exploit(), protocol=2)),
)


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    Exploit.marker.unlink(missing_ok=True)
    yield
    assert not Exploit.marker.exists(), "a pickle was executed"


def run_bounded(fn):
    started = time.monotonic()
    try:
        return fn()
    finally:
        assert time.monotonic() - started < HANG_S, "an input took longer than the hang bound"


def test_validate_safetensors_on_mutated_files(tmp_path, no_unpickling):
    outcomes: collections.Counter = collections.Counter()
    path = tmp_path / "x.safetensors"

    @FUZZ
    @given(hostile_files)
    def check(data: bytes):
        path.write_bytes(data)
        try:
            count = run_bounded(lambda: validate_safetensors(path))
        except ServiceError as exc:
            assert exc.code == ErrorCode.LORA_INVALID, exc
            assert exc.message and "Traceback" not in exc.message
            outcomes["lora_invalid"] += 1
        else:
            assert count >= 1
            outcomes["valid"] += 1

    check()
    print(f"\nvalidate_safetensors fuzz: {sum(outcomes.values())} inputs, {dict(outcomes)}, 0 crashes")
    assert outcomes["lora_invalid"] > 0


def test_store_fetch_of_mutated_files_caches_nothing_it_refuses(tmp_path, no_unpickling):
    """The whole fetch (local path: read, hash, validate, rename into the cache) of each mutated file."""
    store = LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 20, allow_local_paths=True)
    source = tmp_path / "in.safetensors"
    outcomes: collections.Counter = collections.Counter()
    ids = itertools.count()  # a new id each call: an id is immutable, so a reused one would be a cache hit

    @FUZZ
    @given(hostile_files)
    def check(data: bytes):
        source.write_bytes(data)
        before = {p.name for p in store.cache_dir.iterdir()}
        try:
            lora = run_bounded(lambda: store.fetch(f"fuzz-{next(ids)}", str(source)))
        except ServiceError as exc:
            assert exc.code == ErrorCode.LORA_INVALID, exc
            assert {p.name for p in store.cache_dir.iterdir()} == before, "a refused file was cached"
            outcomes["lora_invalid"] += 1
        else:
            assert lora.path.read_bytes() == data, "the cache holds exactly the bytes fetched"
            outcomes["cached"] += 1
        assert list((store.cache_dir / ".tmp").iterdir()) == []

    check()
    print(f"\nstore.fetch fuzz: {sum(outcomes.values())} inputs, {dict(outcomes)}, 0 crashes")
    assert outcomes["lora_invalid"] > 0


# -- Replicate-style bundles: mutated tars ------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_bytes(make_lora) -> list[bytes]:
    """A real bundle, as a plain tar and gzip-compressed."""
    import gzip

    plain = make_lora(seed=4, fmt="replicate").read_bytes()
    return [plain, gzip.compress(plain)]


def test_store_fetch_of_mutated_bundles(tmp_path, bundle_bytes, no_unpickling):
    """Tar and gzip structures mutated at random: refused as lora_invalid (or, where the mutation
    only touched bytes no check covers, cached whole), never another exception, nothing left over."""
    store = LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 24, allow_local_paths=True)
    source = tmp_path / "in.tar"
    outcomes: collections.Counter = collections.Counter()
    ids = itertools.count()

    @FUZZ
    @given(st.sampled_from(range(len(bundle_bytes))), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                               min_size=1, max_size=6), st.floats(0.3, 1))
    def check(which: int, flips: list, keep: float):
        data = bytearray(bundle_bytes[which])
        for where, value in flips:
            data[min(int(where * len(data)), len(data) - 1)] = value
        data = bytes(data[:max(600, int(len(data) * keep))])
        assume(data != bundle_bytes[which])
        source.write_bytes(data)
        before = {p.name for p in store.cache_dir.iterdir()}
        try:
            run_bounded(lambda: store.fetch(f"bundle-{next(ids)}", str(source)))
        except ServiceError as exc:
            assert exc.code == ErrorCode.LORA_INVALID, exc
            assert {p.name for p in store.cache_dir.iterdir()} == before, "a refused bundle was cached"
            outcomes["lora_invalid"] += 1
        else:
            outcomes["cached"] += 1
        assert list((store.cache_dir / ".tmp").iterdir()) == []

    check()
    print(f"\nbundle fuzz: {sum(outcomes.values())} inputs, {dict(outcomes)}, no other exception")
    assert outcomes["lora_invalid"] > 0


def test_a_gzip_bundle_corrupt_after_its_first_member_header_is_invalid(tmp_path, bundle_bytes, no_unpickling):
    """The fuzz's first find: a gzip stream that opens fine (the first tar header inflates) and breaks
    inside a member's data raises zlib.error, which is neither a TarError nor an OSError."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
    data = deflate.compress(bundle_bytes[0][:65536]) + deflate.flush(zlib.Z_FULL_FLUSH) + b"\xff" * 64  # block type 11
    source = tmp_path / "corrupt.tar.gz"
    source.write_bytes(data)
    store = LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 24, allow_local_paths=True)
    with pytest.raises(ServiceError) as err:
        store.fetch("corrupt", str(source))
    assert err.value.code == ErrorCode.LORA_INVALID
    assert store.entries() == [] and list((store.cache_dir / ".tmp").iterdir()) == []


# -- sizes no generator reaches by chance -------------------------------------------------------------


def huge_json_header() -> bytes:
    """~8 MB of header: 100 000 entries that all point at the same 4 bytes."""
    header = {f"unet.k{i}.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for i in range(100_000)}
    return join(header, b"\0\0\0\0")


@pytest.mark.parametrize("name, make", [
    ("length 2**64-1", lambda: join(split(SEEDS[0])[0], split(SEEDS[0])[1], 2**64 - 1)),
    ("length 2**63", lambda: join(split(SEEDS[0])[0], split(SEEDS[0])[1], 2**63)),
    ("length 100 MB + 1, file small", lambda: join(split(SEEDS[0])[0], split(SEEDS[0])[1], 100_000_001)),
    ("length 0", lambda: join(b"", b"", 0)),
    ("huge JSON header", huge_json_header),
    ("header of nested arrays", lambda: join(b"[" * 100_000 + b"]" * 100_000, b"")),
    ("negative offsets", lambda: join({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4)),
    ("offsets past the end", lambda: join({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**62]}}, b"\0" * 4)),
    ("enormous shape", lambda: join({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4)),
    ("shape overflowing u64", lambda: join({"a": {"dtype": "F32", "shape": [2**32, 2**32, 2**8], "data_offsets": [0, 0]}}, b"")),
    ("overlapping tensors", lambda: join({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)),
])
def test_extreme_headers_are_invalid_and_bounded(tmp_path, no_unpickling, name, make):
    path = tmp_path / "x.safetensors"
    path.write_bytes(make())
    with pytest.raises(ServiceError) as err:
        run_bounded(lambda: validate_safetensors(path))
    assert err.value.code == ErrorCode.LORA_INVALID


def test_a_zip_bomb_is_refused_without_being_inflated(tmp_path, no_unpickling, monkeypatch):
    """Zip is never accepted (torch's checkpoints are zips of pickles): refused from its magic bytes,
    and zipfile is never opened."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("lora.safetensors", b"\0" * (256 << 20))  # 256 MiB of zeros in ~250 kB
    source = tmp_path / "bomb.safetensors"
    source.write_bytes(buffer.getvalue())
    assert source.stat().st_size < 1 << 20

    def no_zip(*args, **kwargs):
        raise AssertionError("the zip was opened")

    monkeypatch.setattr(zipfile, "ZipFile", no_zip)
    store = LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 20, allow_local_paths=True)
    with pytest.raises(ServiceError) as err:
        run_bounded(lambda: store.fetch("bomb", str(source)))
    assert err.value.code == ErrorCode.LORA_INVALID and "never loaded" in err.value.message
    assert store.entries() == []
