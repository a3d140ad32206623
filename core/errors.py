"""genq's one error root; every failure a client or a job can see is one of these.

    GenqError                      500 internal
    ├── BadRequestError            400 bad-request
    │   └── InvalidInputError      422 invalid-input   (errors: one entry per bad field)
    ├── UnauthorizedError          401 unauthorized
    ├── ForbiddenError             403 forbidden
    ├── NotFoundError              404 not-found
    ├── ConflictError              409 conflict
    │   ├── IllegalTransitionError 409 illegal-transition
    │   └── LeaseLostError         409 lease-lost      (a write from a worker whose lease is gone)
    ├── PayloadTooLargeError       413 too-large
    ├── BusyError                  503 busy            (at a limit of its own for now; Retry-After)
    ├── QuotaExceededError         429 quota-exceeded  (limit, current, allowed: which quota)
    ├── RateLimitedError           429 rate-limited    (Retry-After, RateLimit, RateLimit-Policy)
    └── JobFailedError             500 job-failed      (a job's own failure; stored on the job)
        ├── ModelError             500 model-error     (the model code raised)
        └── TransientError         503 transient       (worth another attempt)
            ├── StalledError       503 stalled         (the job's actor stopped answering)
            └── WorkerStoppingError 503 worker-stopping (its worker shut down mid-attempt)

Each class carries an HTTP status, a `type` slug and a title; the API renders any of them as
`application/problem+json`, and a failed job stores the slug and the detail.
"""

from __future__ import annotations

from typing import Any


class GenqError(Exception):
    status: int = 500
    type: str = "internal"
    title: str = "Internal error"

    def __init__(self, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra
        self.headers: dict[str, str] = {}  # sent with the problem response

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild without calling __init__ (subclasses take other arguments), so an error
        # raised inside a Ray worker arrives at the caller intact.
        return (self.__class__.__new__, (self.__class__, *self.args), self.__dict__)

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        body.update(self.extra)
        return body


class BadRequestError(GenqError):
    status, type, title = 400, "bad-request", "Bad request"


class InvalidInputError(BadRequestError):
    """422 with `errors`: a list of {"field": "params.steps", "message": "..."}."""

    status, type, title = 422, "invalid-input", "Invalid input"

    def __init__(self, errors: list[dict[str, str]], detail: str = "") -> None:
        fields = ", ".join(e["field"] for e in errors)
        super().__init__(detail or f"invalid value for {fields}", errors=errors)
        self.errors = errors

    @classmethod
    def one(cls, field: str, message: str) -> InvalidInputError:
        return cls([{"field": field, "message": message}], detail=f"{field}: {message}")


class UnauthorizedError(GenqError):
    status, type, title = 401, "unauthorized", "Unauthorized"


class ForbiddenError(GenqError):
    status, type, title = 403, "forbidden", "Forbidden"


class NotFoundError(GenqError):
    status, type, title = 404, "not-found", "Not found"


class ConflictError(GenqError):
    status, type, title = 409, "conflict", "Conflict"


class IllegalTransitionError(ConflictError):
    type, title = "illegal-transition", "Illegal state change"


class LeaseLostError(ConflictError):
    type, title = "lease-lost", "Lease lost"


class PayloadTooLargeError(GenqError):
    status, type, title = 413, "too-large", "Payload too large"


class BusyError(GenqError):
    """503: the server is at a limit of its own for the moment (not a failure): retry after
    `retry_after_s` seconds, which the response's Retry-After header says."""

    status, type, title = 503, "busy", "Busy"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.headers["Retry-After"] = str(retry_after_s)


class QuotaExceededError(GenqError):
    """429: a tenant's quota refuses the request; the body names the limit, its current
    value and what is allowed (core/quotas.py)."""

    status, type, title = 429, "quota-exceeded", "Quota exceeded"


class RateLimitedError(GenqError):
    """429: too many requests from one key, tenant or (failed logins) client address for the
    moment; `Retry-After` says when to come back, `policy` which limit it was."""

    status, type, title = 429, "rate-limited", "Too many requests"

    def __init__(self, detail: str, *, policy: str, retry_after_s: int) -> None:
        super().__init__(detail, policy=policy)
        self.headers["Retry-After"] = str(retry_after_s)


class JobFailedError(GenqError):
    """A job's own failure. `transient` failures are retried while attempts remain."""

    type, title = "job-failed", "Job failed"
    transient = False


class ModelError(JobFailedError):
    type, title = "model-error", "Model error"


class TransientError(JobFailedError):
    status, type, title = 503, "transient", "Transient failure"
    transient = True


class StalledError(TransientError):
    """The actor running the job (model server or trainer) sent no event and answered no
    liveness ping for GENQ_STALL_TIMEOUT_S: it is killed and the job goes back to the queue."""

    type, title = "stalled", "Stalled"


class WorkerStoppingError(TransientError):
    """The worker running the attempt is shutting down: the job goes back to the queue."""

    type, title = "worker-stopping", "Worker stopping"
