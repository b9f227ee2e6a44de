"""Domain errors of the service. The gRPC servicer is the only place that turns
them into status codes; everything below it raises these (or ValueError for bad
input, which the servicer reports as INVALID_ARGUMENT)."""
from __future__ import annotations


class ServiceError(Exception):
    code = "INTERNAL"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Cancelled(ServiceError):
    code = "CANCELLED"


class DataLoss(ServiceError):
    code = "DATA_LOSS"


class Aborted(ServiceError):
    """The session is held: by another call past --hold-wait, or by another replica (its lease is live); the
    message names the holder."""

    code = "ABORTED"


class Unavailable(ServiceError):
    """The store cannot be reached right now; the call changed nothing and may be retried."""

    code = "UNAVAILABLE"
