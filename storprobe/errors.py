"""Named errors: every reason a volume cannot be probed is one of these.

Each error carries a stable ``code`` (``"truncated"``, ``"qcow2.cluster-bits"`` ...)
so callers and tests can tell rules apart without parsing messages.
"""

from __future__ import annotations


class ProbeError(Exception):
    """Base of every error storprobe raises for a volume it cannot probe."""

    code = "probe-error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def reason(self) -> str:
        return str(self)


class SourceError(ProbeError):
    """The volume cannot be opened or read (missing, permission, FIFO, socket ...)."""

    code = "source"


class TruncatedHeader(ProbeError):
    """A field the format needs lies beyond the end of the file."""

    code = "truncated"


class InvalidHeader(ProbeError):
    """A header field breaks one of the format's rules; ``code`` names the rule."""

    code = "invalid-header"


class UnsupportedVersion(ProbeError):
    """The magic of a known format matched but its version is not one we know."""

    code = "unsupported-version"

    def __init__(self, format_name: str, version: int, accepted: tuple[int, ...]) -> None:
        known = ", ".join(str(v) for v in accepted)
        super().__init__(f"unsupported {format_name} version {version} (known: {known})")
        self.format = format_name
        self.version = version
        self.accepted = accepted


class ReadLimitExceeded(ProbeError):
    """The header asks us to read more than the per-probe byte budget allows."""

    code = "read-limit"


class UnknownFormat(ProbeError):
    """The caller named a format that no registered plugin provides."""

    code = "unknown-format"


class Unrepresentable(ProbeError):
    """A name the volume XML must carry (its path, a backing name) holds what XML
    1.0 cannot, even escaped: control characters, bytes that are not UTF-8."""

    code = "xml.unrepresentable"


class InvalidDocument(ProbeError):
    """XML given to storprobe to read is not a volume document it accepts:
    not well-formed, carrying a document type declaration, too large, or not
    valid against its schema."""

    code = "xml.invalid"


class PluginError(Exception):
    """A plugin's rows cannot make a format table (a programming error, raised when
    the table is built, naming the plugin and the row)."""


class PluginConflict(PluginError):
    """Two plugins registered the same format name."""


class InvalidFormatSpec(PluginError):
    """A plugin's row breaks a rule of :class:`~storprobe.spec.FormatSpec` (a field
    no probe could read, a column that needs another one)."""


class BackingError(ProbeError):
    """The backing chain cannot be followed past an image (the images above it
    are still reported)."""

    code = "backing"


class BackingNameError(BackingError):
    """A recorded backing name that cannot be understood (malformed json: or URI)."""

    code = "backing.name"


class BackingMissing(BackingError):
    """The backing file an image names does not exist or cannot be opened."""

    code = "backing.missing"


class BackingLoop(BackingError):
    """The chain comes back to an image already in it."""

    code = "backing.loop"


class ChainTooDeep(BackingError):
    """The chain is longer than the configured limit."""

    code = "backing.too-deep"


class BackingFormatNotSpecified(BackingError):
    """A backing image's format was probed, not recorded, and it has a backing
    file itself: following it would trust the image's own claim (libvirt's rule)."""

    code = "backing.format-not-specified"
