"""The client's exceptions, one per problem `type` genq answers with (RFC 9457 problem+json),
plus the ones that happen on this side.

    GenqClientError
    ├── APIError                 any problem response (status, type, title, detail, errors)
    │   ├── BadRequest           400
    │   │   └── InvalidInput     422 (errors: [{field, message}])
    │   ├── Unauthorized         401
    │   ├── Forbidden            403
    │   ├── NotFound             404
    │   ├── Conflict             409
    │   ├── PayloadTooLarge      413
    │   ├── QuotaExceeded        429 (after the retries)
    │   ├── ServerError          5xx
    │   │   └── Busy             503 (after the retries)
    ├── TransportError           the server could not be reached (after the retries)
    ├── JobFailed                `wait` saw the job fail or get canceled (job: the Job)
    └── WaitTimeout              `wait` gave up; the job goes on (job: the Job as last seen)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genq_client.models import Job


class GenqClientError(Exception):
    """The root of every error this package raises."""


class APIError(GenqClientError):
    """The server answered with a problem (`problem` holds its whole body)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.type: str = str(problem.get("type") or "")
        self.title: str = str(problem.get("title") or "")
        self.detail: str = str(problem.get("detail") or self.title or f"HTTP {status}")
        self.errors: list[dict[str, str]] = list(problem.get("errors") or [])
        super().__init__(f"{status} {self.type}: {self.detail}")


class BadRequest(APIError):
    pass


class InvalidInput(BadRequest):
    pass


class Unauthorized(APIError):
    pass


class Forbidden(APIError):
    pass


class NotFound(APIError):
    pass


class Conflict(APIError):
    pass


class PayloadTooLarge(APIError):
    pass


class QuotaExceeded(APIError):
    pass


class ServerError(APIError):
    pass


class Busy(ServerError):
    pass


class TransportError(GenqClientError):
    pass


class JobFailed(GenqClientError):
    def __init__(self, job: Job) -> None:
        self.job = job
        error = job.error or {}
        super().__init__(
            f"job {job.id} {job.state}: {error.get('type', '')}: {error.get('detail', '')}"
        )


class WaitTimeout(GenqClientError):
    def __init__(self, job: Job, timeout_s: float) -> None:
        self.job = job
        super().__init__(f"job {job.id} is still {job.state} after {timeout_s:g} s")


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidInput,
    429: QuotaExceeded,
    503: Busy,
}


def error_for(status: int, body: Any) -> APIError:
    """The exception for a problem response with `status` and parsed `body`."""
    problem = body if isinstance(body, dict) else {"detail": str(body)[:500]}
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(status, problem)
