"""A pass-through reader for an upload path: the data flows on unchanged, and
a :class:`~storprobe.stream.StreamInspector` sees every chunk on the way.

It has the shape of the wrapper image services already put around upload data
(OpenStack glance's ``InfoWrapper`` from oslo.utils' format_inspector): iterate
it, or call ``read(n)``, and ``close()`` it. At the end of the data it finishes
the inspection; with ``abort`` (the default) it raises :class:`StreamRejected`
as soon as the verdict is a mismatch or unsafe, before passing that chunk on,
so the upload stops early::

    inspector = StreamInspector("qcow2", size=content_length)
    reader = InspectingReader(request_body, inspector)
    try:
        store.put(key, reader)          # iterates or read()s it
    except StreamRejected as rejected:
        ...                             # rejected.verdict says why
    verdict = reader.verdict            # final (or undetermined) once all was read
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from .errors import ProbeError
from .stream import StreamInspector, StreamVerdict

#: Bytes asked of a ``read()``-only source per chunk when the reader is iterated.
CHUNK = 64 * 1024


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class StreamRejected(ProbeError):
    """The upload was rejected while it streamed: ``verdict`` is a mismatch or unsafe."""

    def __init__(self, verdict: StreamVerdict) -> None:
        hazards = "; ".join(f"{h.check}: {h.message}" for h in verdict.hazards)
        super().__init__(f"{verdict.reason} after {verdict.consumed} bytes" + (f" ({hazards})" if hazards else ""),
                         code=f"stream.{verdict.state}")
        self.verdict = verdict


class InspectingReader:
    """Pass ``source`` (an iterable of byte chunks, or an object with ``read``)
    through, feeding ``inspector``; finish it when the source ends."""

    def __init__(self, source: Iterable[bytes] | Readable, inspector: StreamInspector, *, abort: bool = True) -> None:
        self._source = source
        self.inspector = inspector
        self.abort = abort

    @property
    def verdict(self) -> StreamVerdict:
        return self.inspector.verdict()

    def _inspect(self, chunk: bytes) -> bytes:
        if chunk:
            verdict = self.inspector.feed(chunk)
            if self.abort and verdict.rejected:
                raise StreamRejected(verdict)
        else:
            self.inspector.finish()
        return chunk

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the source (all of it when negative), inspected."""
        return self._inspect(self._source.read(size))  # type: ignore[union-attr]

    def __iter__(self) -> Iterator[bytes]:
        if hasattr(self._source, "read"):
            chunks: Iterable[bytes] = iter(lambda: self._source.read(CHUNK), b"")  # type: ignore[union-attr]
        else:
            chunks = self._source
        for chunk in chunks:
            if chunk:
                yield self._inspect(chunk)
        self._inspect(b"")

    def close(self) -> None:
        """Close the source, when it can be closed."""
        close = getattr(self._source, "close", None)
        if close is not None:
            close()
