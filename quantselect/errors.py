"""One small exception hierarchy; the edges (CLI, REST) turn it into exit codes and HTTP statuses."""


class QuantselectError(Exception):
    """Base class. ``str(error)`` is a one-line message that says what to fix."""

    exit_code = 1
    http_status = 500


class InputError(QuantselectError):
    """The user gave something we cannot use (bad file, field, option value)."""

    exit_code = 2
    http_status = 422


class Stopped(QuantselectError):
    """Work given up because its job was cancelled meanwhile (a download, a conversion)."""


class NotFoundError(QuantselectError):
    """A job, candidate or deployment that does not exist."""

    exit_code = 2
    http_status = 404


class ForbiddenError(QuantselectError):
    """The request names what this server does not let its clients use (a path outside its folders)."""

    exit_code = 2
    http_status = 403


class ConflictError(QuantselectError):
    """The request is valid but not in the current state (e.g. deploy before a job finished)."""

    exit_code = 2
    http_status = 409


class CancelledWhileWaiting(ConflictError):
    """A job claimed by its driver (resumed in an API server, waiting for a slot) was cancelled
    meanwhile: the claim ended it cancelled instead of running it."""


class SchemaError(QuantselectError):
    """The database schema is newer or older than this code and cannot be migrated automatically."""

    exit_code = 1
    http_status = 500
