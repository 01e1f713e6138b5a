"""Map botocore and aiohttp errors to shoal errors at the AWS boundary: BlobError (S3), OffloadError (Batch).

Nothing outside ``offload`` knows botocore exists: every S3 call made by
:mod:`offload._s3` is wrapped so callers only ever see ``engine`` errors,
chained (``from exc``) to the original for debugging.  botocore is imported
inside the functions: by the time an error is mapped a request has been
made, so it is already loaded, and importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from engine import BlobError, BlobNotFound, OffloadError
from engine.extend import SubmitFailed

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "error_code",
    "is_aws_error",
    "is_retryable",
    "map_batch_error",
    "map_s3_error",
    "map_s3_errors",
    "mapped_batch_errors",
]

#: Error codes S3 (and S3-compatible stores) use to ask a client to slow down.
THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
        "EC2ThrottledException",
    }
)
#: Codes of failures that a later attempt may not see.
TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed"}
)
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    }
)


def error_code(exc: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status of a botocore ClientError, else ("", 0)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed: throttling, 5xx, dropped or timed-out connections."""
    import aiohttp
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        ResponseStreamingError,
    )

    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        return code in THROTTLING_CODES or code in TRANSIENT_CODES or status == 429 or status >= 500
    return isinstance(
        exc,
        ConnectionError
        | HTTPClientError
        | ResponseStreamingError
        | aiohttp.ClientError
        | asyncio.TimeoutError,
    )


def map_s3_error(
    exc: BaseException, *, action: str, uri: str, endpoint: str, attempts: int = 1
) -> BlobError:
    """The BlobError that tells a user what ``exc`` means for ``action`` on ``uri``."""
    import aiohttp
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    where = f"{action} {uri} (S3 endpoint {endpoint})"
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code == "NoSuchBucket":
            bucket = uri.removeprefix("s3://").split("/", 1)[0]
            return BlobError(
                f"{where} failed: bucket {bucket!r} does not exist; create it, or point "
                "blob_store (SHOAL_BLOB_STORE, [tool.shoal] blob_store) at an existing bucket"
            )
        if code in NOT_FOUND_CODES or status == 404:
            return BlobNotFound(
                f"{where} failed: no such object; it was deleted, or it was written to "
                "another blob store"
            )
        if code in DENIED_CODES or status == 403:
            return BlobError(
                f"{where} was denied ({code}: {message}); check the AWS credentials "
                "(AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the bucket policy"
            )
        if code in THROTTLING_CODES or status == 429 or status >= 500:
            return BlobError(
                f"{where} failed{tried}: S3 answered {code or status} ({message}); "
                "the service is throttling or unavailable, try again later"
            )
        return BlobError(f"{where} failed: {code or status}: {message}")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return BlobError(
            f"{where} failed: no AWS credentials found ({exc}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or configure ~/.aws/credentials"
        )
    if isinstance(exc, NoRegionError):
        return BlobError(f"{where} failed: no AWS region configured; set AWS_DEFAULT_REGION")
    if isinstance(exc, ConnectionError | aiohttp.ClientConnectionError):
        return BlobError(
            f"{where} failed{tried}: cannot reach the S3 endpoint ({exc}); check endpoint_url "
            "or AWS_ENDPOINT_URL and the network"
        )
    if isinstance(exc, asyncio.TimeoutError):
        return BlobError(f"{where} timed out{tried}; check the network or raise the timeouts")
    return BlobError(f"{where} failed{tried}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def map_s3_errors(*, action: str, uri: str, endpoint: str) -> Iterator[None]:
    """Re-raise botocore/aiohttp errors from the block as BlobError, chained."""
    try:
        yield
    except BlobError:
        raise
    except Exception as exc:
        if _is_third_party(exc):
            raise map_s3_error(exc, action=action, uri=uri, endpoint=endpoint) from exc
        raise


def _is_third_party(exc: BaseException) -> bool:
    import aiohttp
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, BotoCoreError | ClientError | aiohttp.ClientError | asyncio.TimeoutError)


# -- AWS Batch (offload.Batch) ---------------------------------------------------


def is_aws_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from botocore or aiohttp (and is mapped at this boundary)."""
    import aiohttp
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, BotoCoreError | ClientError | aiohttp.ClientError | asyncio.TimeoutError)


@contextlib.contextmanager
def mapped_batch_errors(what: str) -> Iterator[None]:
    """Re-raise botocore/aiohttp errors from the block as OffloadError about ``what``, chained."""
    try:
        yield
    except Exception as exc:
        if is_aws_error(exc):
            raise map_batch_error(exc, what) from exc
        raise


def map_batch_error(exc: BaseException, what: str, *, attempts: int = 1, submit: bool = False) -> OffloadError:
    """The OffloadError that says what ``exc`` means for ``what`` (which names the queue or job)."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    tried = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return OffloadError(
            f"cannot {what}: no AWS credentials found ({exc}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or configure ~/.aws/credentials"
        )
    if isinstance(exc, NoRegionError):
        return OffloadError(f"cannot {what}: no AWS region configured; pass region= or set AWS_DEFAULT_REGION")
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code in THROTTLING_CODES or status == 429 or status >= 500:
            error_type: type[OffloadError] = SubmitFailed if submit else OffloadError
            return error_type(
                f"cannot {what}{tried}: AWS Batch answered {code or status} ({message}); the "
                "service is throttling or unavailable, try again later"
            )
        if status in (401, 403) or code in ("AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException"):
            return OffloadError(
                f"cannot {what}: denied ({code}: {message}); check the AWS credentials and their "
                "IAM permissions for AWS Batch"
            )
        return OffloadError(f"cannot {what}: {code or status}: {message}")
    if isinstance(exc, EndpointConnectionError):
        error_type = SubmitFailed if submit else OffloadError
        return error_type(f"cannot {what}{tried}: cannot reach AWS Batch ({exc}); check endpoint_url, region and the network")
    error_type = SubmitFailed if submit else OffloadError
    return error_type(f"cannot {what}{tried}: {type(exc).__name__}: {exc}")
