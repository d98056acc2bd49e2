"""The runner's one error tree.

Each class's docstring is its default message. A processor's own failure (non-zero
exit, OOM, timeout) is an outcome, not an exception: only the platform raises.
"""

from __future__ import annotations

from typing import Any

from runner.domain import ErrorCode


class RunnerError(Exception):
    """The runner failed."""

    code: str = "internal_error"

    def __init__(self, message: str | None = None, **context: Any) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)
        super().__init__(self.message)


class ConfigError(RunnerError):
    """A setting is invalid."""

    code = "invalid_setting"


class ManifestError(RunnerError):
    """The manifest is invalid."""

    code = "invalid_manifest"

    def __init__(self, message: str | None = None, *, problems: list[str] | None = None,
                 **context: Any) -> None:
        self.problems = problems or []
        if message is None and self.problems:
            message = "; ".join(self.problems)
        super().__init__(message, **context)


# Domain errors the API turns into 4xx answers.

class NotFoundError(RunnerError):
    """No such resource."""

    code = "not_found"


class InvalidRequestError(RunnerError):
    """The request is invalid."""

    code = "invalid_request"


class UnknownProcessorError(InvalidRequestError):
    """No processor of that name and version is in the manifest."""

    code = "unknown_processor"


class InvalidInputError(InvalidRequestError):
    """The input does not match the processor's input schema."""

    code = ErrorCode.INVALID_INPUT.value


class PayloadTooLargeError(RunnerError):
    """The body is over its cap; nothing of it was kept."""

    code = "file_too_large"


class RangeNotSatisfiableError(RunnerError):
    """The requested byte range is outside the content."""

    code = "range_not_satisfiable"


class ConflictError(RunnerError):
    """The resource is in a state that does not allow this."""

    code = "conflict"


class AuthenticationError(RunnerError):
    """A valid API key is required."""

    code = "unauthenticated"


class PermissionDeniedError(RunnerError):
    """This API key's role does not allow this."""

    code = "forbidden"


class RateLimitedError(RunnerError):
    """Too many requests; retry after the time given."""

    code = "rate_limited"


class QuotaExceededError(RateLimitedError):
    """The tenant has reached a quota."""

    code = "quota_exceeded"


class ServiceUnavailableError(RunnerError):
    """A service the runner depends on is unavailable."""

    code = "unavailable"


class StorageError(ServiceUnavailableError):
    """The file store (a directory or the database) failed to read or write a blob."""

    code = "storage_unavailable"


# Platform failures while executing an attempt; each carries the run's error code.

class SandboxError(RunnerError):
    """The container platform failed."""

    error_code: ErrorCode = ErrorCode.INTERNAL_ERROR


class DockerUnavailableError(SandboxError):
    """The Docker engine could not be reached."""

    error_code = ErrorCode.DOCKER_UNAVAILABLE


class ImagePullError(SandboxError):
    """The pinned image could not be pulled."""

    error_code = ErrorCode.IMAGE_PULL_FAILED


class DigestMismatchError(SandboxError):
    """The local image does not carry the pinned digest."""

    error_code = ErrorCode.DIGEST_MISMATCH


class ImageNotAllowedError(SandboxError):
    """The pinned image is not allowed to run (it declares a `VOLUME`)."""

    error_code = ErrorCode.IMAGE_NOT_ALLOWED


class SandboxMismatchError(SandboxError):
    """The created container's settings, read back from the engine, are not the ones
    asked for: it is removed before it starts."""

    error_code = ErrorCode.SANDBOX_MISMATCH


class PublishError(RunnerError):
    """Building or pushing a processor image failed."""

    code = "publish_failed"
