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
    message names the holder. owner, address: the replica holding it and where clients reach it ("" when it is
    another call of this replica, or unknown). Nothing was done: the same call may be sent again."""

    code = "ABORTED"

    def __init__(self, message: str, *, owner: str = "", address: str = ""):
        super().__init__(message)
        self.owner, self.address = owner, address


class Unavailable(ServiceError):
    """The store cannot be reached right now; the call changed nothing and may be retried."""

    code = "UNAVAILABLE"
