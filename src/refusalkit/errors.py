"""The one exception type users see: a problem in their input, with what to do about it."""


class RefusalkitError(Exception):
    """A user-facing error. The message names the problem and the fix; the CLI prints it without a trace."""
