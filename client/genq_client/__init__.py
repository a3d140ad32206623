"""genq's Python client: `Client` (sync) and `AsyncClient` (asyncio), typed models of what the
API returns, and one exception per problem type. Built on httpx; imports nothing of the
server."""

from genq_client.aio import AsyncClient
from genq_client.client import Client
from genq_client.errors import (
    APIError,
    BadRequest,
    Busy,
    Conflict,
    Forbidden,
    GenqClientError,
    InvalidInput,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    ServerError,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from genq_client.models import Batch, Dataset, Event, Job, Model, Output

__all__ = [
    "APIError",
    "AsyncClient",
    "BadRequest",
    "Batch",
    "Busy",
    "Client",
    "Conflict",
    "Dataset",
    "Event",
    "Forbidden",
    "GenqClientError",
    "InvalidInput",
    "Job",
    "JobFailed",
    "Model",
    "NotFound",
    "Output",
    "PayloadTooLarge",
    "QuotaExceeded",
    "ServerError",
    "TransportError",
    "Unauthorized",
    "WaitTimeout",
]
