"""The cold path off the lock: a LoRA is read, verified, parsed and preflighted in the fetch threads,
while another request holds the pipeline, and its file is read once, as views of one buffer."""

from __future__ import annotations

import hashlib
import json
import struct
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import inference.prepared
from inference.integrity import CorruptEntry, read_verified
from inference.safetensors_buffer import load_buffer
from inference.service import InferenceService
from inference.settings import Settings
from sdxl_lora_client.contract import GenerateRequest
from tests.servers import FileServer

WAIT_S = 120  # an upper bound for a loaded machine, never a measurement


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("served")
    for name, seed, fmt in (("a", 1, "diffusers"), ("k", 2, "kohya"), ("bundle", 3, "replicate")):
        suffix = ".tar" if fmt == "replicate" else ".safetensors"
        (root / f"{name}{suffix}").write_bytes(make_lora(seed=seed, fmt=fmt).read_bytes())
    with FileServer(root) as server:
        yield server


def generate_request(server, *names: str) -> GenerateRequest:
    return GenerateRequest.model_validate({
        "prompt": "TOK, a character portrait", "num_inference_steps": 1, "width": 64, "height": 64, "seed": 1,
        "loras": [{"id": name, "url": server.url(name)} for name in names]})


def test_a_lora_is_read_and_parsed_while_another_request_holds_the_pipeline(engine, lora_server, tmp_path,
                                                                            monkeypatch):
    """The test holds the engine's lock, as a request that is denoising would: the new request's LoRAs
    are read and preflighted meanwhile, in the fetch threads; under the lock nothing is read again."""
    settings = Settings(model="unused", device="cpu", lora_cache_dir=tmp_path / "cache", allow_private_urls=True,
                        max_resident_adapters=2)
    service = InferenceService(settings, engine=engine)
    engine.adapters.clear()
    calls = []
    both_prepared = threading.Event()

    def recording(real):
        def wrapper(*args, **kwargs):
            calls.append((real.__name__, threading.current_thread().name, engine.lock.locked()))
            if sum(name == "check_lora_weights" for name, _, _ in calls) == 2:
                both_prepared.set()
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(inference.prepared, "read_lora", recording(inference.prepared.read_lora))
    monkeypatch.setattr(inference.prepared, "check_lora_weights", recording(inference.prepared.check_lora_weights))
    result = {}
    with engine.lock:  # another request's generation
        worker = threading.Thread(target=lambda: result.update(
            response=service.generate(generate_request(lora_server, "a.safetensors", "bundle.tar"))))
        worker.start()
        assert both_prepared.wait(WAIT_S), "the LoRAs were not prepared while the pipeline was busy"
        assert worker.is_alive(), "the request waits for the pipeline"
    worker.join(WAIT_S)
    assert [lora.source for lora in result["response"].loras] == ["download", "download"]
    assert sorted(name for name, _, _ in calls) == ["check_lora_weights"] * 2 + ["read_lora"] * 2, \
        "each LoRA read once, before the lock, and never again under it"
    assert all(thread.startswith("fetch") and held for _, thread, held in calls), calls


def test_a_resident_lora_is_not_read_again(engine, lora_server, tmp_path, monkeypatch):
    service = InferenceService(Settings(model="unused", device="cpu", lora_cache_dir=tmp_path / "cache",
                                        allow_private_urls=True), engine=engine)
    service.generate(generate_request(lora_server, "k.safetensors"))
    reads = []
    monkeypatch.setattr(inference.prepared, "read_lora", lambda *a, **k: reads.append(a) or pytest.fail("read"))
    response = service.generate(generate_request(lora_server, "k.safetensors"))
    assert response.loras[0].source == "resident" and reads == []


# -- one pass over the bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_tensors_viewed_from_the_read_buffer_equal_safetensors_own(make_lora, fmt):
    path = make_lora(seed=4, fmt=fmt, text_encoders=True)
    buffer = read_verified(path, hashlib.sha256(path.read_bytes()).hexdigest())
    tensors, metadata = load_buffer(buffer)
    expected = load_file(path)
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name
        assert tensors[name].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr(), "a view, no copy"
    with safe_open(path, framework="pt") as f:
        assert metadata == f.metadata()


def test_a_misaligned_tensor_is_copied_and_still_right(tmp_path):
    """safetensors aligns what it writes; a file from elsewhere may not be: an odd-length F16 tensor
    puts the next F32 tensor off its 4-byte boundary."""
    half, single = torch.arange(3, dtype=torch.float16), torch.arange(5, dtype=torch.float32)
    header = {"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
              "b": {"dtype": "F32", "shape": [5], "data_offsets": [6, 26]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + half.numpy().tobytes() + single.numpy().tobytes())
    tensors, _ = load_buffer(read_verified(path, None))
    assert torch.equal(tensors["a"], half) and torch.equal(tensors["b"], single)


def _file(header: dict, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


BROKEN = {
    "empty": b"",
    "header_past_the_end": _file({}, b"", length=10_000),
    "not_json": struct.pack("<Q", 4) + b"\xff\xfe{]",
    "unknown_dtype": _file({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "size_disagrees": _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    "truncated": _file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "overlap": _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "trailing_bytes": _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
    "metadata_not_strings": _file({"__metadata__": {"x": 1}}, b""),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_malformed_file_is_refused_with_a_reason(tmp_path, case):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(BROKEN[case])
    with pytest.raises(ValueError) as refused:
        load_buffer(read_verified(path, None))
    assert str(refused.value)


def test_a_file_that_is_not_its_sha256_is_never_parsed(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    with pytest.raises(CorruptEntry):
        read_verified(path, "0" * 64)
    assert torch.equal(load_buffer(read_verified(path, hashlib.sha256(path.read_bytes()).hexdigest()))[0]["w"],
                       torch.ones(4))
