"""The warning category of srum_trl's own warnings.

Every warning the library raises is a [`SRUMTrlWarning`] (a `UserWarning`), so that users can filter them and the
test suite can turn them into errors (a warning of ours that a test does not expect is a defect) while it ignores the
deprecation notices of the libraries we build on (see CONTRIBUTING.md).
"""

from __future__ import annotations

import warnings


class SRUMTrlWarning(UserWarning):
    """A warning raised by srum_trl itself."""


def warn(message: str, stacklevel: int = 2) -> None:
    """`warnings.warn(message, SRUMTrlWarning)`, attributed to the caller's caller by default."""
    warnings.warn(message, SRUMTrlWarning, stacklevel=stacklevel + 1)
