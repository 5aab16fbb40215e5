"""Every error the dispatcher raises on purpose, under one root.

Errors that a node sees carry the wire ``code`` of the contract.
"""

from __future__ import annotations

from dispatcher.vocabulary import CloseCode, ErrorCode


class DispatcherError(Exception):
    """Raised for any failure the dispatcher anticipates."""


class ConfigError(DispatcherError):
    """Raised when the configuration cannot be read or is inconsistent."""


class StoreError(DispatcherError):
    """Raised when the store fails: Redis refused a command or could not be reached (the
    redis-py error is the ``__cause__``: ``dispatcher.store`` translates every one), or a
    script answered something it never returns. Nothing outside the core sees redis-py's
    own errors."""


class StoreUnavailable(StoreError):
    """Raised when Redis cannot be reached, did not answer in time, or refused for the moment
    (read-only during a failover, out of memory, busy with a long script): the same call may
    work later."""


class ScriptRetry(StoreError):
    """Raised when a script saw state change since the caller read it; the caller retries."""

    def __init__(self, script: str, stored: str | None = None) -> None:
        super().__init__(f"{script}: stored state changed since it was read")
        #: What the script found stored, when that helps the retry.
        self.stored = stored


class JobMoved(ScriptRetry):
    """Raised when the job went to another node since the caller read which one it is on:
    the caller reads it again and retries."""

    def __init__(self, script: str) -> None:
        StoreError.__init__(self, f"{script}: the job moved to another node since it was read")
        self.stored = None


class KindNeeded(ScriptRetry):
    """Raised when a job script would send the job back to wait and was not given its kind of
    needs (nothing was written): the caller reads the kind and retries with it."""

    def __init__(self, script: str) -> None:
        StoreError.__init__(self, f"{script}: the job would wait again, and its kind of needs was not given")
        self.stored = None


# --- errors a node session answers with an ``error`` frame -----------------


class ProtocolError(DispatcherError):
    """Raised when a node's frame cannot be accepted; ``code`` is the wire error code."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR
    #: Close the session after answering (with this WebSocket close code).
    close_code: CloseCode | None = None


class InvalidMessage(ProtocolError):
    """Raised when a frame is not JSON, has an unknown type or fails validation."""

    code = ErrorCode.INVALID_MESSAGE


class MessageTooLarge(ProtocolError):
    """Raised when a frame exceeds ``max_message_bytes``."""

    code = ErrorCode.MESSAGE_TOO_LARGE
    close_code = CloseCode.TOO_LARGE


class NotRegistered(ProtocolError):
    """Raised when a session sends anything but ``node_register`` before registering."""

    code = ErrorCode.NOT_REGISTERED


class NodeIdMismatch(ProtocolError):
    """Raised when a registered session names a node other than its own."""

    code = ErrorCode.NODE_ID_MISMATCH


class NodeIdConflict(ProtocolError):
    """Raised when a known ``node_id`` registers without its secret."""

    code = ErrorCode.NODE_ID_CONFLICT

    def __init__(self) -> None:
        super().__init__("node_id conflict: clear the local node_id and register again")


class Unauthorized(ProtocolError):
    """Raised when registration tokens are configured and the frame has no valid one."""

    code = ErrorCode.UNAUTHORIZED
    close_code = CloseCode.POLICY


class RateLimited(ProtocolError):
    """Raised when a session sends frames faster than ``max_messages_per_second``."""

    code = ErrorCode.RATE_LIMITED


class SessionSuperseded(ProtocolError):
    """Raised when a newer session of the same node took over; this one must close."""

    code = ErrorCode.NODE_ID_CONFLICT
    close_code = CloseCode.SUPERSEDED


class NodeOffline(ProtocolError):
    """Raised when the node was taken offline while its session stayed open; it must register again."""

    code = ErrorCode.NOT_REGISTERED
    close_code = CloseCode.NODE_OFFLINE


# --- errors of jobs and operations -----------------------------------------


class JobError(DispatcherError):
    """Raised for a job that cannot be accepted or acted on."""


class InvalidJob(JobError):
    """Raised when submitted job fields fail validation; the message names the field."""


class UnknownJob(JobError):
    """Raised when a job id is not known to the dispatcher."""


# Raised in a client's ``AsyncResult.get()`` (the client sees them by name and
# message even without this package installed).


class JobFailed(JobError):
    """Raised when the node reported a failure and no attempt is left; the message has its code."""


class NoEligibleNode(JobFailed):
    """Raised when no node was eligible within dispatch_timeout_seconds; the message counts why."""


class JobTimedOut(JobFailed):
    """Raised when the node did not finish an attempt within timeout_seconds and no attempt is left."""


class NodeLost(JobFailed):
    """Raised when the job's node went away (offline, or drained at its deadline) and no attempt is left."""


class UnknownNode(DispatcherError):
    """Raised when a node id is not known to the dispatcher."""


class InvalidTransition(DispatcherError):
    """Raised when an operator asks for a status change the status rules forbid."""
