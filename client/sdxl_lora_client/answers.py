"""Every answer checked before it is used or charged.

A 200 with the right shape is not yet a good answer: its image must decode, hash to the `sha256`
it names, have the type and size asked for, carry the seed the client sent, and its `loras` must
echo the LoRA ids and sha256 asked for. An image delivered by URL is fetched and checked the same
way; a Replicate prediction must have succeeded with an output URL. Anything else is a
`BackendError` (or `ReplicateError`) with code `invalid_answer`, as the SDKs of Stripe and boto3
check the checksums they are given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from urllib.parse import urlsplit

import httpx

from sdxl_lora_client.contract import GenerateRequest, GenerateResponse, ImageOut
from sdxl_lora_client.errors import BackendError, ClientCode, ReplicateError
from sdxl_lora_client.http import LoopClients
from sdxl_lora_client.image_headers import NotAnImage, read_image_info
from sdxl_lora_client.replicate import Prediction

__all__ = ["ImageFetcher", "check_generate_answer", "check_prediction"]

MIME_OF_FORMAT = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_IMAGE_BYTES = 64 * 1024 * 1024
FETCH_TIMEOUT_S = 60.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ImageFetcher:
    """Fetches an image delivered by URL (bounded in size and time), from any event loop."""

    def __init__(self, timeout_s: float = FETCH_TIMEOUT_S, transport: httpx.AsyncBaseTransport | None = None):
        self._http = LoopClients(None, transport, timeout=timeout_s, follow_redirects=True)

    async def fetch(self, url: str) -> bytes:
        try:
            async with self._http.current().stream("GET", url) as response:
                if response.status_code != 200:
                    raise _invalid(f"the image URL answered {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_IMAGE_BYTES:
                        raise _invalid(f"the image at its URL is over {MAX_IMAGE_BYTES} bytes")
                return bytes(data)
        except httpx.HTTPError as exc:
            raise _invalid(f"the image URL could not be fetched: {exc!r}") from exc

    def close(self) -> None:
        self._http.close()

    async def aclose(self) -> None:
        await self._http.aclose()


async def check_generate_answer(request: GenerateRequest, response: GenerateResponse,
                                fetcher: ImageFetcher) -> str:
    """The reference to hand the video model (a data: URI or the image's URL) once the answer holds
    up against the request; `invalid_answer` otherwise."""
    if len(response.images) != request.num_images:
        raise _invalid(f"{len(response.images)} images for {request.num_images} asked")
    _check_loras(request, response)
    image = response.images[0]
    if request.seed is not None and image.seed != request.seed:
        raise _invalid(f"seed {image.seed}, not the {request.seed} sent")
    data = await _image_bytes(request, image, fetcher)
    if hashlib.sha256(data).hexdigest() != image.sha256.lower():
        raise _invalid(f"the image's bytes do not hash to its sha256 {image.sha256[:16]}...")
    try:
        info = read_image_info(data)
    except NotAnImage as exc:
        raise _invalid(f"the image does not decode: {exc}") from None
    asked_mime = MIME_OF_FORMAT[request.output.format]
    if not info.mime == image.mime == asked_mime:
        raise _invalid(f"an image of type {info.mime} labelled {image.mime}, {asked_mime} asked")
    if (info.width, info.height) != (image.width, image.height):
        raise _invalid(f"an image of {info.width}x{info.height} labelled {image.width}x{image.height}")
    if request.width is not None and (info.width, info.height) != (request.width, request.height):
        raise _invalid(f"an image of {info.width}x{info.height}, {request.width}x{request.height} asked")
    return image.url if request.output.delivery == "url" and image.url else f"data:{info.mime};base64,{image.base64}"


def _check_loras(request: GenerateRequest, response: GenerateResponse) -> None:
    asked = {lora.id: (lora.sha256 or "").lower() for lora in request.loras}
    answered = {lora.id: lora.sha256.lower() for lora in response.loras}
    if len(answered) != len(response.loras) or answered.keys() != asked.keys():
        raise _invalid(f"the answer's LoRAs {sorted(answered)} are not the ones asked, {sorted(asked)}")
    for lora_id, sha256 in answered.items():
        if not _SHA256.match(sha256) or (asked[lora_id] and sha256 != asked[lora_id]):
            raise _invalid(f"LoRA {lora_id} answered with sha256 {sha256[:16]}..., "
                           f"{asked[lora_id][:16] or 'a sha256'}... asked")


async def _image_bytes(request: GenerateRequest, image: ImageOut, fetcher: ImageFetcher) -> bytes:
    if request.output.delivery == "url":
        if not image.url or urlsplit(image.url).scheme not in ("https", "http"):
            raise _invalid(f"url delivery asked, the answer's url is {image.url!r:.80}")
        return await fetcher.fetch(image.url)
    if not image.base64:
        raise _invalid("base64 delivery asked, the answer's image has no base64")
    try:
        return base64.b64decode(image.base64, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("the image's base64 is not base64") from None


def check_prediction(prediction: Prediction) -> str:
    """The video URL of a succeeded prediction; ReplicateError when it holds none."""
    urls = prediction.output_urls()
    if prediction.status != "succeeded" or not urls or urlsplit(urls[0]).scheme not in ("https", "http"):
        raise ReplicateError(f"{ClientCode.INVALID_ANSWER}: prediction {prediction.id} {prediction.status} "
                             f"with output {prediction.output!r:.80}")
    return urls[0]


def _invalid(message: str) -> BackendError:
    return BackendError(f"invalid answer: {message}", ClientCode.INVALID_ANSWER, True)
