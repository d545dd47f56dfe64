"""The wire contract is strict: integers are integers, URLs are not empty, and the OpenAPI schema
says exactly what the server checks (bearer auth only when a key is set)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.app import create_app
from inference.settings import Settings
from sdxl_lora_client.contract import GenerateRequest

INTEGER_FIELDS = {"seed": 42, "num_inference_steps": 20, "num_images": 2, "width": 512, "height": 512}
NOT_INTEGERS = {"true": True, "false": False, "string": "42", "fraction": 4.5, "null_for_required": None}


def valid(**extra) -> dict:
    return {"prompt": "p", **extra}


OPTIONAL = {"seed", "width", "height"}  # null means absent there


@pytest.mark.parametrize("name,kind", [(name, kind) for name in sorted(INTEGER_FIELDS) for kind in sorted(NOT_INTEGERS)
                                       if not (name in OPTIONAL and NOT_INTEGERS[kind] is None)])
def test_integer_fields_take_integers_only(name, kind):
    value = NOT_INTEGERS[kind]
    extra = {name: value}
    if name in ("width", "height"):
        extra = {"width": 512, "height": 512, name: value}
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(valid(**extra))
    GenerateRequest.model_validate(valid(**{**extra, name: INTEGER_FIELDS[name]}))  # the same request, fixed


@pytest.mark.parametrize("name", sorted(INTEGER_FIELDS))
def test_a_whole_float_is_the_integer_json_schema_says_it_is(name):
    """{"type": "integer"} admits 512.0 (JSON has one number type); the server takes what its schema admits."""
    extra = {"width": 512, "height": 512} if name in ("width", "height") else {}
    request = GenerateRequest.model_validate(valid(**{**extra, name: float(INTEGER_FIELDS[name])}))
    value = getattr(request, name)
    assert value == INTEGER_FIELDS[name] and type(value) is int


@pytest.mark.parametrize("field,value", [("strength", "0.5"), ("strength", True), ("guidance_scale", "7"),
                                         ("guidance_scale", False)])
def test_number_fields_refuse_strings_and_booleans_but_take_integers(field, value):
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(valid(**{field: value}))
    assert getattr(GenerateRequest.model_validate(valid(**{field: 1})), field) == 1.0


@pytest.mark.parametrize("body", [valid(image=""), valid(loras=[{"id": "a", "url": ""}]),
                                  valid(loras=[{"id": "a", "url": "https://x/a.safetensors", "scale": "1"}])])
def test_empty_urls_and_lax_lora_fields_are_refused(body):
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(body)


class _Unloaded:
    """The app's schema and validation need no pipeline."""

    ready = False
    settings = Settings(model="unused", device="cpu")

    def load(self) -> None:
        pass


def client(api_key: str | None) -> TestClient:
    settings = Settings(model="unused", device="cpu", api_key=api_key)
    return TestClient(create_app(settings, service=_Unloaded()))


@pytest.mark.parametrize("name", sorted(INTEGER_FIELDS))
def test_the_service_answers_a_boolean_integer_with_invalid_request(name):
    with client(None) as http:
        response = http.post("/v1/generate", json=valid(**{"width": 64, "height": 64, name: True}))
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    assert name in response.json()["error"]["message"]


def test_openapi_advertises_bearer_auth_only_when_a_key_is_set():
    with client(None) as http:
        keyless = http.get("/openapi.json").json()
    with client("secret") as http:
        keyed = http.get("/openapi.json").json()
    assert "securitySchemes" not in keyless.get("components", {})
    assert not any("security" in op for path in keyless["paths"].values() for op in path.values())
    assert "401" not in keyless["paths"]["/v1/generate"]["post"]["responses"]
    assert keyed["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert keyed["paths"]["/v1/generate"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "401" in keyed["paths"]["/v1/generate"]["post"]["responses"]
    assert "504" in keyed["paths"]["/v1/generate"]["post"]["responses"]


def test_the_json_schema_carries_every_integer_bound():
    """Bounds on an optional field reach the schema as minimum/maximum (a Field's bounds on `X | None`
    with a validator would not: they came out as pydantic's own ge/le, which JSON Schema ignores)."""
    props = GenerateRequest.model_json_schema()["properties"]
    for side in ("width", "height"):
        schema = props[side]["anyOf"][0]
        assert (schema["type"], schema["minimum"], schema["maximum"], schema["multipleOf"]) == ("integer", 64, 2048, 8)
    assert props["seed"]["anyOf"][0]["minimum"] == 0 and props["seed"]["anyOf"][0]["maximum"] == 2**63 - 9
    assert (props["num_inference_steps"]["minimum"], props["num_inference_steps"]["maximum"]) == (1, 100)
    assert (props["num_images"]["minimum"], props["num_images"]["maximum"]) == (1, 8)
    assert not any(key in json.dumps(props) for key in ('"ge"', '"le"', '"multiple_of"'))


NOT_URLS = ["ก ำกำ", "/etc/passwd", "file:///etc/passwd", "ftp://host/a.safetensors", "https://", "s3:/bucket/key",
            "https://host/a b.safetensors", "https://host/a\n.safetensors", "hf://org/repo/a.safetensors",
            "https://[::1/a.safetensors", "https://host:99999/a.safetensors"]  # the last two: urllib cannot split them


@pytest.mark.parametrize("url", NOT_URLS)
def test_a_lora_url_that_is_not_an_http_or_s3_url_is_invalid_request(url):
    """Refused at validation (422 invalid_request, over HTTP and RunPod alike), never a failed download."""
    from handler.worker import make_handler

    body = valid(width=64, height=64, loras=[{"id": "a", "url": url}])
    with client(None) as http:
        response = http.post("/v1/generate", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request" and "loras.0.url" in response.json()["error"]["message"]
    error = json.loads(asyncio.run(make_handler(_Unloaded())({"id": "job", "input": body}))["error"])
    assert error["code"] == "invalid_request" and "loras.0.url" in error["message"]


@pytest.mark.parametrize("url", ["https://host/a.safetensors", "http://10.0.0.1:8080/x?sig=a%20b", "s3://bucket/chars/a.safetensors"])
def test_http_https_and_s3_urls_are_lora_urls(url):
    assert GenerateRequest.model_validate(valid(loras=[{"id": "a", "url": url}])).loras[0].url == url


def test_the_json_schema_says_what_a_lora_url_is():
    from sdxl_lora_client.contract import PrefetchRequest

    with client(None) as http:
        openapi = http.get("/openapi.json").json()
    urls = [openapi["components"]["schemas"]["LoraSpec"]["properties"]["url"],
            GenerateRequest.model_json_schema()["$defs"]["LoraSpec"]["properties"]["url"],
            PrefetchRequest.model_json_schema()["$defs"]["PrefetchLora"]["properties"]["url"]]
    assert [url["pattern"] for url in urls] == [r"^(https?|s3)://[^\s]+$"] * 3
