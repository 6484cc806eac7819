"""The one error type of the data layer.

Every problem with data on disk or on the wire (a missing root, a wrong layout, a corrupt zip, a checksum
mismatch, an episode that asks for more than the data holds) raises :class:`DataError` with a one-line message
that names the problem and the fix. It subclasses ``ValueError`` so callers that already catch bad-argument
errors keep working, and so the command line can print it as a one-line error.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing benchmark data, or an episode the data cannot provide; the message says how to fix it."""
