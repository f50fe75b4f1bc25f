"""The ``storprobe`` command.

Exit status: 0 success, 1 a volume could not be probed (one line
``storprobe: PATH: reason`` on stderr), 2 usage error, 3 ``check`` found the
volume unsafe.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TextIO

from .detect import probe
from .errors import ProbeError, UnknownFormat
from .registry import format_table

if TYPE_CHECKING:
    from .scan import ScanRecord

EXIT_OK, EXIT_PROBE, EXIT_USAGE, EXIT_UNSAFE = 0, 1, 2, 3
#: JSON lines a scan writes between flushes of its output.
SCAN_FLUSH = 32


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storprobe", description="Tell what a disk image is from its bytes alone."
    )
    parser.add_argument("--version", action=_Version, help="print storprobe's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="describe one volume (qemu-img info compatible)")
    info.add_argument("-f", "--format", help="trust this format instead of probing")
    info.add_argument("--output", choices=("human", "json", "xml"), default="human")
    info.add_argument("--backing-chain", action="store_true", help="describe every image of the backing chain")
    info.add_argument(
        "--allow-probe", action="store_true",
        help="follow backing files whose format had to be probed (unsafe with untrusted images)",
    )
    info.add_argument("--max-depth", type=int, default=None, metavar="N", help="longest backing chain followed")
    info.add_argument("path", metavar="PATH")

    scan = sub.add_parser("scan", help="probe every volume in a directory (a libvirt dir pool refresh)")
    scan.add_argument("--output", choices=("json", "xml"), default="json")
    scan.add_argument("--jsonl", action="store_true", help="JSON lines: one record per line, as made")
    scan.add_argument("--recursive", action="store_true", help="descend into subdirectories")
    scan.add_argument(
        "--jobs", type=_positive, default=None, metavar="N",
        help="processes probing in parallel (default: one per usable CPU, at most 8)",
    )
    scan.add_argument("directory", metavar="DIR")

    check = sub.add_parser("check", help="is this image safe to hand to a hypervisor? (exit 0 safe, 3 unsafe)")
    check.add_argument("-f", "--format", help="the format the volume is declared as (e.g. raw)")
    check.add_argument("--allow", metavar="FORMAT,...", help="formats accepted (default: any)")
    check.add_argument("--allow-backing", action="store_true", help="accept a backing file")
    check.add_argument("--allow-data-file", action="store_true", help="accept a qcow2 external data file")
    check.add_argument("--max-size", type=int, metavar="BYTES", help="largest virtual size accepted")
    check.add_argument("--output", choices=("human", "json"), default="human")
    check.add_argument("path", metavar="PATH")

    validate = sub.add_parser("validate", help="validate volume XML against storprobe's schemas")
    validate.add_argument("files", metavar="FILE.xml", nargs="+")

    formats = sub.add_parser("formats", help="list the registered format table")
    formats.add_argument("--output", choices=("human", "json"), default="human")
    return parser


class _Version(argparse.Action):
    """``--version``: the installed version, looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from . import __version__

        sys.stdout.write(f"storprobe {__version__}\n")
        parser.exit()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _complain(subject: str, reason: str) -> None:
    """One line on stderr, terminal-safe: a reason may quote names from an image."""
    from .human import shown

    print(f"storprobe: {shown(subject)}: {shown(reason)}", file=sys.stderr)


def _info(args: argparse.Namespace) -> int:
    try:
        if args.backing_chain:
            from .chain import DEFAULT_MAX_DEPTH, probe_chain

            depth = DEFAULT_MAX_DEPTH if args.max_depth is None else args.max_depth
            chain = probe_chain(args.path, format=args.format, allow_probe=args.allow_probe, max_depth=depth)
            images, error = chain.images, chain.error
        else:
            chain, images, error = None, [probe(args.path, format=args.format)], None
    except ProbeError as exc:
        _complain(args.path, exc.reason)
        return EXIT_PROBE
    if args.output == "xml":
        from .volume_xml import to_volume_xml

        try:
            text = to_volume_xml(images[0], chain)
        except ProbeError as exc:  # a name XML cannot carry
            _complain(args.path, exc.reason)
            return EXIT_PROBE
        sys.stdout.write(text)
    elif args.output == "json":
        from .qemu_json import to_qemu_json

        shaped = [to_qemu_json(info) for info in images]
        print(json.dumps(shaped if args.backing_chain else shaped[0], indent=4))
    else:
        from .human import render

        print("\n\n".join(render(info) for info in images))
    if error is not None:
        _complain(args.path, error.reason)
        return EXIT_PROBE
    return EXIT_OK


def _scan(args: argparse.Namespace) -> int:
    from .scan import scan_map

    try:
        entries = scan_map(args.directory, _scan_renderer(args), recursive=args.recursive, jobs=args.jobs)
    except ProbeError as exc:
        _complain(args.directory, exc.reason)
        return EXIT_PROBE
    entries = _progress(entries, args)
    out = sys.stdout
    if args.output == "xml":
        from .volume_xml import scan_document_parts

        out.writelines(scan_document_parts(entries))
    elif args.jsonl:
        for count, line in enumerate(entries, 1):
            out.write(line)
            if count % SCAN_FLUSH == 0:
                out.flush()  # lines go out as they are made, a batch at a time
    else:
        from .jsontext import write_array

        write_array(entries, out)
    return EXIT_OK


def _scan_renderer(args: argparse.Namespace) -> Callable[[ScanRecord], str]:
    """How ``scan`` turns a record into its text (run by the worker processes)."""
    if args.output == "xml":
        from .volume_xml import scan_entry

        return scan_entry
    from .jsontext import indented
    from .qemu_json import scan_record

    if args.jsonl:
        return lambda record: json.dumps(scan_record(record)) + "\n"
    return lambda record: indented(scan_record(record), 1)


def _progress(entries: Iterator[str], args: argparse.Namespace) -> Iterator[str]:
    """``entries``, counted on a progress bar on stderr when a person watches
    it there (stderr a terminal, stdout not), the scan lasts over a second and
    tqdm is installed (the ``progress`` extra); without tqdm, no bar."""
    if not sys.stderr.isatty() or sys.stdout.isatty():
        return entries
    try:
        from tqdm import tqdm
    except ImportError:
        return entries

    tqdm.monitor_interval = 0  # no monitor thread: the scan forks workers
    total = None if args.recursive else len(os.listdir(args.directory))
    return tqdm(entries, total=total, unit="vol", file=sys.stderr, delay=1.0, leave=False)


def _check(args: argparse.Namespace) -> int:
    from .safety import DEFAULT_MAX_VIRTUAL_SIZE, check, policy_from_allow

    policy = policy_from_allow(
        args.allow, allow_backing=args.allow_backing, allow_data_file=args.allow_data_file,
        max_virtual_size=DEFAULT_MAX_VIRTUAL_SIZE if args.max_size is None else args.max_size,
    )
    try:
        verdict = check(args.path, policy=policy, format=args.format)
    except ProbeError as exc:
        _complain(args.path, exc.reason)
        return EXIT_PROBE
    info = verdict.info
    if args.output == "json":
        out = {
            "filename": verdict.path,
            "safe": verdict.safe,
            "format": info.format if info else None,
            "encryption": info.encryption if info else None,
            "hazards": [{"check": h.check, "message": h.message} for h in verdict.hazards],
        }
        print(json.dumps(out, indent=4))
    else:
        what = f"{info.format}" + (f", encrypted ({info.encryption})" if info and info.encryption else "") if info else "unreadable header"
        print(f"{verdict.path}: {'safe' if verdict.safe else 'UNSAFE'} ({what})")
        for hazard in verdict.hazards:
            print(f"{hazard.check}: {hazard.message}")
    return EXIT_OK if verdict.safe else EXIT_UNSAFE


def _validate(args: argparse.Namespace) -> int:
    from .validate import MAX_DOCUMENT, schema_errors

    status = EXIT_OK
    for name in args.files:
        try:
            with open(name, "rb") as f:
                errors = schema_errors(f.read(MAX_DOCUMENT + 1))  # one byte more tells "too large"
        except OSError as exc:
            errors = [exc.strerror or str(exc)]
        for error in errors:
            _complain(name, error)
        if errors:
            status = EXIT_PROBE
        else:
            print(f"{name}: valid")
    return status


def _printable(magic: bytes) -> str:
    """Magic bytes as text with escapes for the unprintable ones: ``QFI\\xfb``."""
    return repr(magic)[2:-1]


def _formats(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": row.spec.name,
            "description": row.spec.description,
            "magic": " | ".join(_printable(m) for m in row.spec.magics) or None,
            "magic-offset": row.spec.magic_offset if row.spec.magic is not None else None,
            "header-offsets": list(row.spec.header_offsets),
            "extension": row.spec.extension,
            "versions": list(row.spec.versions),
            "plugin": row.plugin,
        }
        for row in format_table().rows
    ]
    if args.output == "json":
        print(json.dumps(rows, indent=4))
        return EXIT_OK
    print(f"{'FORMAT':<11}{'MAGIC':<28}{'OFFSET':>7}  {'VERSIONS':<22}{'PLUGIN'}")
    for row in rows:
        magic = row["magic"] or "-"
        magic = magic if len(magic) <= 26 else magic[:23] + "..."
        offset = "-" if row["magic-offset"] is None else str(row["magic-offset"])
        if row["header-offsets"] != [0]:
            offset += "@" + ",".join(str(o) for o in row["header-offsets"])
        versions = ",".join(hex(v) if v > 9 else str(v) for v in row["versions"]) or "-"
        print(f"{row['name']:<11}{magic:<28}{offset:>7}  {versions:<22}{row['plugin']}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. Whatever happens to standard output
    there is no traceback: a failed write (a full disk, descriptor 1 closed)
    is one line ``storprobe: write error: REASON`` and status 1, and a reader
    that went away (EPIPE) ends the command quietly."""
    stdout = sys.stdout
    sys.stdout = _Output(stdout)  # type: ignore[assignment]
    try:
        try:
            status = _run(argv)
        except SystemExit as exc:  # argparse's --help, --version and usage errors
            status = exc.code if isinstance(exc.code, int) else EXIT_USAGE
        sys.stdout.flush()  # a last write error shows here, not at interpreter exit
    except OutputFailed as failed:
        _discard(stdout)
        if isinstance(failed.error, BrokenPipeError):
            return EXIT_OK
        _complain("write error", failed.error.strerror or str(failed.error))
        return EXIT_PROBE
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout = stdout
    return status


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            if args.format is not None and args.format not in format_table():
                parser.error(f"unknown format {args.format!r} (see 'storprobe formats')")
            return _info(args)
        if args.command == "check" and args.format is not None and args.format not in format_table():
            parser.error(f"unknown format {args.format!r} (see 'storprobe formats')")
        commands = {"scan": _scan, "check": _check, "validate": _validate, "formats": _formats}
        return commands[args.command](args)
    except UnknownFormat as exc:
        parser.error(str(exc))


class OutputFailed(Exception):
    """Writing standard output failed; ``error`` says why."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class _Output:
    """Standard output while a command runs. A failed write raises
    :class:`OutputFailed`, which no ``except OSError`` on the way to
    :func:`main` swallows (argparse's help does); ``stream`` None is
    descriptor 1 closed when the interpreter started."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            if self.stream is None:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            return self.stream.write(text)
        except OSError as exc:
            raise OutputFailed(exc) from None

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            if self.stream is not None:
                self.stream.flush()
        except OSError as exc:
            raise OutputFailed(exc) from None

    def isatty(self) -> bool:
        return self.stream is not None and self.stream.isatty()


def _discard(stream: TextIO | None) -> None:
    """Point ``stream``'s descriptor at /dev/null: the interpreter's final
    flush of what it still buffers then succeeds instead of printing
    "Exception ignored ... OSError" (or tries again to write to a reader that left)."""
    try:
        fd = stream.fileno() if stream is not None else -1
    except (OSError, ValueError):  # not a real file (a test's capture), or closed
        return
    if fd >= 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)


if __name__ == "__main__":
    sys.exit(main())
