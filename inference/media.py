"""Images in and out of the service: the reference image a request names, and the uploads of
``delivery: "url"``. Both reach S3 through the service's one `SharedS3Client`."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import uuid
from datetime import datetime, timezone

from PIL import Image

from inference.deadline import Deadline, timed_out
from inference.errors import ErrorCode, ServiceError
from inference.fetch import FetchError
from inference.images import MIME, decode_image
from inference.settings import Settings
from inference.sources import SCHEMES_SAID, SharedS3Client, fetch_to_file, is_remote

log = logging.getLogger(__name__)


def load_reference(source: str, settings: Settings, s3: SharedS3Client,
                   deadline: Deadline | None = None) -> Image.Image:
    """The reference image from a ``data:`` URI or a remote URL, within `deadline`; `image_invalid`
    (or `timeout`) when it cannot be had."""
    limit = settings.max_image_bytes
    if source.startswith("data:"):
        data = _decode_data_uri(source, limit)
    elif is_remote(source):
        buffer = io.BytesIO()
        try:
            fetch_to_file(source, buffer, allow_private=settings.allow_private_urls, max_bytes=limit,
                          timeout_s=settings.download_timeout_s, deadline=deadline, s3_client_factory=s3.get)
        except FetchError as exc:
            if deadline is not None and deadline.expired:
                raise timed_out(deadline, "while fetching the reference image") from exc
            raise ServiceError(ErrorCode.IMAGE_INVALID, f"cannot fetch the reference image: {exc}") from exc
        data = buffer.getvalue()
    else:
        raise ServiceError(ErrorCode.IMAGE_INVALID, f"image must be an {SCHEMES_SAID} URL, or a data: URI")
    return decode_image(data)


def _decode_data_uri(source: str, limit: int) -> bytes:
    header, _, payload = source.partition(",")
    if ";base64" not in header:
        raise ServiceError(ErrorCode.IMAGE_INVALID, "data: URIs must be base64-encoded")
    if len(payload) > limit * 4 // 3 + 4:
        raise ServiceError(ErrorCode.IMAGE_INVALID, f"image is larger than {limit} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(ErrorCode.IMAGE_INVALID, f"data: URI is not valid base64: {exc}") from exc


def upload(data: bytes, fmt: str, settings: Settings, s3: SharedS3Client) -> str:
    """Put the image in the bucket and presign a GET. Transient failures are retried by boto3
    itself (`make_s3_client`: standard mode, 3 attempts); no second retry layer on top of it."""
    s = settings
    key = f"{s.s3_prefix}{datetime.now(timezone.utc):%Y/%m/%d}/{uuid.uuid4().hex}.{fmt}"
    try:
        s3.get().put_object(Bucket=s.s3_bucket, Key=key, Body=data, ContentType=MIME[fmt])
        return s3.get().generate_presigned_url(
            "get_object", Params={"Bucket": s.s3_bucket, "Key": key}, ExpiresIn=s.presign_expiry_s)
    except Exception as exc:
        log.warning("upload of %s failed: %s", key, exc)
        raise ServiceError(ErrorCode.UPLOAD_FAILED, f"could not upload the image to s3://{s.s3_bucket}: {exc}") from exc
