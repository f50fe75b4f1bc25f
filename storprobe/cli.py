"""The ``storprobe`` command.

Exit status: 0 success, 1 a volume could not be probed (one line
``storprobe: PATH: reason`` on stderr) or standard output could not be
written (``storprobe: write error: REASON``), 2 usage error (with the
command's usage), 3 ``check`` found the volume unsafe, 4 ``check --stream``
could not decide (the verdict needed bytes the stream had already passed).
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

from .detect import probe
from .errors import BackingFormatNotSpecified, PluginError, ProbeError
from .registry import format_table
from .urls import is_url

if TYPE_CHECKING:
    from .allocation import Allocation
    from .chain import Chain
    from .datapath import BackingPolicy, GuestDisk
    from .model import ImageInfo
    from .safety import Policy
    from .scan import ScanRecord
    from .spec import Hazard
    from .stream import StreamVerdict

    #: The commands' parsers, as argparse keeps them.
    _Commands: TypeAlias = "argparse._SubParsersAction[_CommandParser]"

EXIT_OK, EXIT_PROBE, EXIT_USAGE, EXIT_UNSAFE = 0, 1, 2, 3
EXIT_UNDETERMINED = 4
#: Most bytes ``check --stream`` reads at once (less when the pipe holds less).
STREAM_CHUNK = 1 << 20
#: JSON lines a scan writes between flushes of its output.
SCAN_FLUSH = 32


_ENDPOINT_HELP = (
    "with a URL: the S3-compatible store's endpoint, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL, "
    "else AWS's); credentials come from the AWS_* environment or the AWS config files"
)


def _trusted_format_option(parser: argparse.ArgumentParser) -> None:
    """``-f/--format``: the caller's format, trusted instead of probed."""
    parser.add_argument(
        "-f", "--format", type=_format_name,
        help="trust this format instead of probing (one of 'storprobe formats'); its signature must be there",
    )


def _max_size_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--max-size``: the data path's bound on the virtual size of what it reads."""
    parser.add_argument(
        "--max-size", type=_size, metavar="SIZE",
        help=f"largest virtual size accepted for {what} (a larger one is refused before any table is read): bytes, "
             "or with a suffix k, M, G, T, P or E as qemu-img takes (1.5G, 64T; default: 64 TiB)",
    )


def _parser(command: str | None = None) -> _Parser:
    """The command line's parser: every command's, or ``command``'s alone
    (declaring every command's arguments is a third of a command's start-up)."""
    parser = _Parser(
        prog="storprobe", description="Tell what a disk image is from its bytes alone.", formatter_class=_Formatter
    )
    parser.add_argument("--version", action=_Version, help="print storprobe's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    parser.commands = sub.choices
    for name, (declare, _) in _COMMANDS.items():
        if command in (None, name):
            declare(sub)
    return parser


def _declare_info(sub: _Commands) -> None:
    info = sub.add_parser(
        "info", help="describe one volume (qemu-img info compatible)",
        description="Describe one volume from its bytes alone, as qemu-img info does.",
    )
    _trusted_format_option(info)
    info.add_argument(
        "--output", choices=("human", "json", "xml"), default="human",
        help="human: qemu-img info's lines, then storprobe's; json: qemu-img info --output=json's object "
             "with a \"storprobe\" key; xml: virsh vol-dumpxml's <volume> (default: %(default)s)",
    )
    info.add_argument(
        "--backing-chain", action="store_true",
        help="describe every image of the backing chain, top first (local files only: a backing on the "
             "network or a host device ends it, never opened)",
    )
    info.add_argument(
        "--allow-probe", action="store_true",
        help="with --backing-chain: follow a backing file whose format had to be probed and that has a "
             "backing file itself (unsafe with untrusted images)",
    )
    info.add_argument(
        "--max-depth", type=_positive, metavar="N",
        help="with --backing-chain: the most backing images followed below the top one (default: 200, libvirt's)",
    )
    info.add_argument(
        "--backing-in-store", action="store_true",
        help="with --backing-chain and a URL: follow backing names relative to the object to the objects they "
             "name in the same bucket or host (never an absolute path, a protocol or another store)",
    )
    info.add_argument(
        "--inspect-guest", action="store_true",
        help="also read the guest disk (through the recorded local backing chain) and report its partition table "
             "and what each partition holds, under storprobe.guest (json) or guest: (human)",
    )
    info.add_argument(
        "--allocated", action="store_true",
        help="also read each image's own block map (its backing file ignored) and report the bytes of guest data "
             "it holds and the bytes it records as zeros, under storprobe.allocated (json) or allocated: (human)",
    )
    info.add_argument("--endpoint-url", metavar="URL", help=_ENDPOINT_HELP)
    info.add_argument(
        "path", metavar="PATH",
        help="the volume: an image file, a block device, a directory, or an object's URL (s3://, gs://, az://, "
             "http(s)://, read by ranges)",
    )


def _declare_scan(sub: _Commands) -> None:
    scan = sub.add_parser(
        "scan", help="probe every volume in a directory (a libvirt dir pool refresh)",
        description="Probe every entry of a directory, in name order, as a libvirt dir pool refresh does; "
                    "an entry that cannot be probed is a record with its error.",
    )
    scan.add_argument(
        "--output", choices=("json", "xml"), default="json",
        help="json: an array of qemu-img info objects; xml: a <volumes> document of virsh vol-dumpxml "
             "<volume>s (default: %(default)s)",
    )
    scan.add_argument("--jsonl", action="store_true", help="with JSON: one object per line, written as made")
    scan.add_argument("--recursive", action="store_true", help="descend into subdirectories (not symlinked ones)")
    scan.add_argument(
        "--jobs", type=_positive, default=None, metavar="N",
        help="processes probing in parallel (default: one per usable CPU, at most 8)",
    )
    scan.add_argument(
        "--to", metavar="DEST",
        help="write an inventory into DEST, a directory or a store's prefix (s3://bucket/inventory/), instead of "
             "records on stdout: Parquet parts, one per batch of entries, and a manifest; stdout gets a summary",
    )
    scan.add_argument(
        "--to-format", choices=("parquet", "jsonl"), default="parquet",
        help="with --to: the parts' format (default: %(default)s)",
    )
    scan.add_argument(
        "--dask", nargs="?", const="", type=_scheduler, metavar="SCHEDULER",
        help="with --to: probe the batches on a Dask cluster, the one whose scheduler listens at SCHEDULER "
             "(tcp://HOST:PORT), or without it a LocalCluster on this machine (--jobs workers); needs the "
             "fleet extra",
    )
    scan.add_argument(
        "--since", metavar="INVENTORY",
        help="with --to: carry over from this earlier inventory (not DEST) the rows of entries unchanged since, "
             "without reading them: an object's size and ETag, a file's size, times, device and inode",
    )
    scan.add_argument(
        "--batch", type=_positive, default=None, metavar="N",
        help="with --to: entries per part, each one task (default: 256)",
    )
    scan.add_argument(
        "--concurrency", type=_positive, default=None, metavar="N",
        help="with a URL: objects probed at once (default: 64)",
    )
    scan.add_argument("--endpoint-url", metavar="URL", help=_ENDPOINT_HELP)
    scan.add_argument(
        "directory", metavar="DIR",
        help="the directory (a dir pool's target path), or a store's prefix (s3://bucket/prefix/): every object "
             "under it, in key order",
    )


def _declare_check(sub: _Commands) -> None:
    check = sub.add_parser(
        "check", help="is this image safe to hand to a hypervisor? (exit 0 safe, 3 unsafe)",
        description="Judge an untrusted image under a policy: exit 0 safe, 3 unsafe (one line per hazard), "
                    "1 when it cannot be read.",
    )
    check.add_argument(
        "-f", "--format", type=_format_name,
        help="the format the volume is declared as, e.g. raw (default: probe it)",
    )
    check.add_argument(
        "--allow", action=_FormatNames, metavar="FORMAT,...",
        help="formats accepted, repeatable (default: any; a directory only when its format is listed)",
    )
    check.add_argument(
        "--allow-backing", action="store_true",
        help="accept backing files in the image's own directory only (as --allow-backing-in its directory)",
    )
    check.add_argument(
        "--allow-backing-in", action="append", default=[], metavar="DIR",
        help="accept backing files inside DIR (repeatable): regular files, no symlink leading out, "
             "with a recorded format; the whole chain is judged",
    )
    check.add_argument(
        "--allow-backing-protocol", action="append", default=[], metavar="PROTOCOL,...",
        help="accept network backings over these protocols (repeatable), e.g. nbd,rbd; host devices, "
             "host directories, debug and null drivers are never accepted",
    )
    check.add_argument(
        "--allow-data-file", action="store_true",
        help="accept a qcow2 external data file in the image's own directory only",
    )
    check.add_argument(
        "--allow-data-file-in", action="append", default=[], metavar="DIR",
        help="accept a qcow2 external data file inside DIR (repeatable)",
    )
    check.add_argument(
        "--max-size", type=_size, metavar="SIZE",
        help="largest virtual size accepted: bytes, or with a suffix k, M, G, T, P or E as qemu-img takes "
             "(1.5G, 64T; default: 64 TiB)",
    )
    check.add_argument(
        "--output", choices=("human", "json"), default="human",
        help="human: a verdict line, then one line per hazard; json: the verdict as an object (default: %(default)s)",
    )
    check.add_argument(
        "--stream", action="store_true",
        help="read PATH (- for standard input) once, front to back, as an upload arrives, and stop reading at the "
             "first mismatch with -f or hazard its head shows; exit 4 when the verdict needs bytes already passed",
    )
    check.add_argument(
        "--stream-size", type=_size, metavar="SIZE",
        help="with --stream: the stream's length when known beforehand (a Content-Length), which makes early "
             "verdicts exact and a stream of another length an error",
    )
    check.add_argument("--endpoint-url", metavar="URL", help=_ENDPOINT_HELP)
    check.add_argument("path", metavar="PATH", help="the volume to judge (a path, or an object's URL)")


def _declare_verify(sub: _Commands) -> None:
    verify = sub.add_parser(
        "verify", help="check an image's metadata as qemu-img check does (read-only; its exit codes)",
        description="Check the consistency of an image's metadata as qemu-img check does, without repairing "
                    "anything: exit 0 clean, 2 corruptions, 3 leaked clusters only, 63 the format has no check, "
                    "1 it could not be checked.",
    )
    _trusted_format_option(verify)
    verify.add_argument(
        "--output", choices=("human", "json"), default="human",
        help="human: qemu-img check's lines; json: qemu-img check --output=json's object (default: %(default)s)",
    )
    _max_size_option(verify, "the image")
    verify.add_argument("path", metavar="PATH", help="the image to check")


def _declare_map(sub: _Commands) -> None:
    map_ = sub.add_parser(
        "map", help="where the guest's data lies, as qemu-img map shows it",
        description="Map the guest disk of an image, range by range: data, zeros or unallocated, the image of "
                    "the backing chain that holds it and where in its file, as qemu-img map prints it. A recorded "
                    "local backing chain is followed as info --backing-chain follows it.",
    )
    _trusted_format_option(map_)
    map_.add_argument(
        "--output", choices=("human", "json"), default="human",
        help="human: qemu-img map's table of data ranges; json: qemu-img map --output=json's array "
             "(default: %(default)s)",
    )
    map_.add_argument(
        "--no-backing", action="store_true",
        help="read the image alone: what its backing file would hold shows as unallocated zeros",
    )
    map_.add_argument(
        "--compressed", action="store_true",
        help="with --output json: a \"compressed\" key on every range, as QEMU 8.2 prints it",
    )
    map_.add_argument(
        "--max-depth", type=_positive, metavar="N",
        help="the most backing images followed below the top one (default: 200, libvirt's)",
    )
    _max_size_option(map_, "the image and each of its backing files")
    map_.add_argument("path", metavar="PATH", help="the image")


def _declare_inspect(sub: _Commands) -> None:
    inspect = sub.add_parser(
        "inspect", help="what the guest disk holds: partition table, filesystems, LUKS, or nothing",
        description="Read an image's guest disk (through its recorded local backing chain, as qemu-img does) and "
                    "report its partition table (MBR or GPT) and what starts each partition, or the whole disk: "
                    "a filesystem, swap, LVM or LUKS by type, label and UUID (as blkid names them), and whether "
                    "the disk is empty (no data allocated anywhere).",
    )
    _trusted_format_option(inspect)
    inspect.add_argument(
        "--output", choices=("human", "json"), default="human",
        help="human: one fact a line; json: an object (default: %(default)s)",
    )
    inspect.add_argument(
        "--no-backing", action="store_true",
        help="read the image alone: what its backing file would hold reads as zeros",
    )
    _max_size_option(inspect, "the image and each of its backing files")
    inspect.add_argument("path", metavar="PATH", help="the image")


def _declare_compare(sub: _Commands) -> None:
    compare = sub.add_parser(
        "compare", help="do two images hold the same guest data? (qemu-img compare's messages and exit codes)",
        description="Compare the guest disks of two images, through their recorded local backing chains, as "
                    "qemu-img compare does: exit 0 identical, 1 different, 2 an image cannot be opened, 3 its "
                    "allocation cannot be read, 4 its data cannot be read. Zeros beyond the smaller disk count "
                    "as equal unless -s.",
    )
    compare.add_argument(
        "-f", dest="format", type=_format_name, metavar="FMT", help="the first image's format, trusted"
    )
    compare.add_argument("-F", dest="second_format", type=_format_name, metavar="FMT",
                         help="the second image's format, trusted")
    compare.add_argument(
        "-s", "--strict", action="store_true",
        help="strict: images of different sizes, or whose allocation differs, are different",
    )
    compare.add_argument("-q", "--quiet", action="store_true", help="print nothing; the exit status says it")
    compare.add_argument(
        "--no-backing", action="store_true",
        help="read each image alone: what its backing file would hold reads as zeros",
    )
    _max_size_option(compare, "each image and each of their backing files")
    compare.add_argument("first", metavar="FILE1", help="the first image")
    compare.add_argument("second", metavar="FILE2", help="the second image")


def _declare_convert(sub: _Commands) -> None:
    convert = sub.add_parser(
        "convert", help="write an image's guest disk as a sparse raw file (qemu-img convert -O raw)",
        description="Write the guest disk of SRC, through its recorded local backing chain, to the new raw file "
                    "DST: the bytes qemu-img convert -O raw writes, with zero and unallocated ranges left as holes. "
                    "DST must not exist, unless --overwrite (a regular file only, never a link).",
    )
    convert.add_argument(
        "-f", dest="format", type=_format_name, metavar="FMT",
        help="trust this format for SRC instead of probing (one of 'storprobe formats')",
    )
    convert.add_argument("-O", dest="target", choices=("raw",), default="raw", help="the output format (raw only)")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it is a regular file")
    convert.add_argument(
        "--no-backing", action="store_true",
        help="read SRC alone: what its backing file would hold is written as zeros",
    )
    _max_size_option(convert, "SRC and each of its backing files")
    convert.add_argument("source", metavar="SRC", help="the image")
    convert.add_argument("destination", metavar="DST", help="the raw file to create")


def _declare_measure(sub: _Commands) -> None:
    measure = sub.add_parser(
        "measure", help="the size a new image would take (qemu-img measure)",
        description="How many bytes a new image of format -O needs, for a virtual size (--size) or to hold a "
                    "source's data (its allocated clusters, through its local backing chain), as qemu-img measure "
                    "counts them: required now, fully allocated, and the source's persistent bitmaps.",
    )
    measure.add_argument(
        "--output", default="human", metavar="human|json",
        help="human: qemu-img measure's lines; json: its --output=json object (default: %(default)s)",
    )
    measure.add_argument(
        "-O", dest="target", default="raw", metavar="OUTPUT_FORMAT",
        help="the new image's format (default: %(default)s)",
    )
    measure.add_argument(
        "-o", dest="options", action="append", default=[], metavar="OPTIONS",
        help="its creation options, as qemu-img create -o takes them (repeatable): cluster_size, refcount_bits, "
             "extended_l2, preallocation, compat, backing_file ...",
    )
    measure.add_argument(
        "--size", metavar="SIZE", help="a virtual size (k, M, G, T, P, E suffixes) instead of a source",
    )
    measure.add_argument(
        "-f", dest="format", type=_format_name,
        help="the source's format, trusted instead of probed (one of 'storprobe formats'); its signature must be there",
    )
    measure.add_argument(
        "--no-backing", action="store_true",
        help="measure the source's top image alone (what its backing files hold is not counted)",
    )
    measure.add_argument(
        "-U", "--force-share", action="store_true", help="accepted for qemu-img's sake: nothing is locked",
    )
    measure.add_argument(
        "--object", dest="objects", action="append", default=[], metavar="secret,id=ID,...",
        help="a secret an encrypted target's key-secret names (repeatable); its value is never read",
    )
    _max_size_option(measure, "SRC and each of its backing files")
    measure.add_argument("source", nargs="*", metavar="SRC", help="the image whose data the new one would hold")


def _declare_validate(sub: _Commands) -> None:
    validate = sub.add_parser(
        "validate", help="validate volume XML against storprobe's schemas",
        description="Validate volume XML against storprobe's RelaxNG schema: 'FILE: valid' or 'FILE: invalid' "
                    "on stdout, each reason (with its line) on stderr.",
    )
    validate.add_argument("files", metavar="FILE.xml", nargs="+", help="documents to validate ('-': standard input)")


def _declare_formats(sub: _Commands) -> None:
    formats = sub.add_parser("formats", help="list the registered format table")
    formats.add_argument(
        "--output", choices=("human", "json"), default="human",
        help="human: a table; json: an array of objects (default: %(default)s)",
    )


class _Parser(argparse.ArgumentParser):
    """The top-level parser, which knows each command's parser: a usage
    error of a command shows that command's usage, not the top level's."""

    commands: dict[str, _CommandParser]


class _Formatter(argparse.HelpFormatter):
    """argparse's help, as wide as the terminal, found without importing
    shutil (which argparse imports for it on every ``add_argument``: about a
    tenth of a command's start-up, with the compression modules it imports)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class _CommandParser(argparse.ArgumentParser):
    """A command's parser, with :class:`_Formatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size()`` tells it: ``COLUMNS``,
    else standard output's terminal, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Version(argparse.Action):
    """``--version``: the installed version, looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from . import __version__

        sys.stdout.write(f"storprobe {__version__}\n")
        parser.exit()


def _format_name(name: str) -> str:
    """A format the table holds; a usage error, listing those it does, for any other."""
    known = format_table().names()
    if name not in known:
        raise argparse.ArgumentTypeError(f"unknown format {name!r} (known: {', '.join(sorted(known))})")
    return name


class _FormatNames(argparse.Action):
    """``--allow qcow2,raw --allow vmdk``: the known formats of every list given."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, *_: object
    ) -> None:
        given = [name.strip() for name in str(values).split(",") if name.strip()]
        if not given:
            raise argparse.ArgumentError(self, "no format named")
        try:
            names = [_format_name(name) for name in given]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or ()), *names])


def _size(text: str) -> int:
    from .sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _scheduler(text: str) -> str:
    """A Dask scheduler's address (``tcp://HOST:PORT``, ``HOST:PORT``), not the
    directory that ``--dask DIR`` puts where an address may stand; empty:
    ``--dask`` given alone, a LocalCluster."""
    if text and ":" not in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is no scheduler address (tcp://HOST:PORT); for a LocalCluster, put --dask after DIR"
        )
    return text


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
        stop = None
        if args.backing_chain and is_url(args.path):
            chain, stop = _object_chain(args)
            images, error = chain.images, chain.error
        elif args.backing_chain:
            from .chain import DEFAULT_MAX_DEPTH, probe_chain

            depth = DEFAULT_MAX_DEPTH if args.max_depth is None else args.max_depth
            chain = probe_chain(args.path, format=args.format, allow_probe=args.allow_probe, max_depth=depth)
            images, error = chain.images, chain.error
            stop = _chain_stop(chain)
        else:
            chain, images, error = None, [probe(args.path, format=args.format, endpoint_url=args.endpoint_url)], None
    except ProbeError as exc:
        _complain(args.path, exc.reason)
        return EXIT_PROBE
    guest, guest_error = None, None
    if args.inspect_guest:
        from .guest import inspect_disk

        try:
            with _open_guest(args.path, args.format, False) as disk:
                guest = inspect_disk(disk)
        except ProbeError as exc:  # shown with the image; the status says it failed
            guest_error = exc
    allocated: Sequence[Allocation | ProbeError | None] = [None] * len(images)
    if args.allocated:
        from .allocation import chain_allocations

        allocated = chain_allocations(images, args.format)  # an image's error is shown with it
    if args.output == "xml":
        from .volume_xml import to_volume_xml

        try:
            text = to_volume_xml(images[0], chain)
        except ProbeError as exc:  # a name XML cannot carry
            _complain(args.path, exc.reason)
            return EXIT_PROBE
        sys.stdout.write(text)
    elif args.output == "json":
        from .qemu_json import EXTRA_KEY, allocation_json, to_qemu_json

        shaped = [to_qemu_json(info) for info in images]
        if guest is not None:
            from .qemu_json import guest_json

            shaped[0][EXTRA_KEY]["guest"] = guest_json(guest)
        elif guest_error is not None:
            shaped[0][EXTRA_KEY]["guest"] = {"error": {"code": guest_error.code, "message": guest_error.reason}}
        for image, held in zip(shaped, allocated, strict=True):
            if held is not None:
                image[EXTRA_KEY]["allocated"] = allocation_json(held)
        if stop is not None:
            shaped[-1][EXTRA_KEY]["chain-stops"] = {"code": "backing.not-followed", "message": stop}
        print(json.dumps(shaped if args.backing_chain else shaped[0], indent=4))
    else:
        from .human import render, shown

        print("\n\n".join(render(info, held) for info, held in zip(images, allocated, strict=True)))
        if guest is not None:
            from .human import render_guest

            print(render_guest(guest))
        elif guest_error is not None:
            print(f"guest:\n    error: {shown(guest_error.reason)}")
        if stop is not None:
            print(f"\n{shown(stop)}")
    unread = [(info, held) for info, held in zip(images, allocated, strict=True) if isinstance(held, ProbeError)]
    for info, held in unread:
        _complain(info.filename, f"allocated bytes: {held.reason}")
    if error is not None:
        _complain(args.path, _chain_error(error, images))
        return EXIT_PROBE
    if guest_error is not None:
        _complain(args.path, f"guest disk: {guest_error.reason}")
        return EXIT_PROBE
    return EXIT_PROBE if unread else EXIT_OK


def _chain_stop(chain: Chain | None) -> str | None:
    """Why a chain walked without error ends at an image that names a backing:
    the backing is no local file (a network server, a host device ...), which
    storprobe never opens."""
    store = chain.stores[-1] if chain is not None and chain.error is None and chain.stores else None
    if store is None or store.is_file:
        return None
    return f"backing chain stops at {store.name} ({store.reach}): only local files are followed"


def _object_chain(args: argparse.Namespace) -> tuple[Chain, str | None]:
    """``info --backing-chain URL``: the object, its backing reported and not looked for unless
    ``--backing-in-store``; and why the chain ends at an image that names a backing."""
    from .chain import DEFAULT_MAX_DEPTH, Chain

    if not args.backing_in_store:
        top = probe(args.path, format=args.format, endpoint_url=args.endpoint_url)
        if top.backing is None:
            return Chain([top], []), None
        return Chain([top], []), (
            f"backing chain stops at {top.backing.name}: the backing of an object is not looked for in its store "
            "(--backing-in-store follows a name relative to it)"
        )
    from .objectchain import probe_object_chain

    depth = DEFAULT_MAX_DEPTH if args.max_depth is None else args.max_depth
    walked = probe_object_chain(
        args.path, format=args.format, allow_probe=args.allow_probe, max_depth=depth, endpoint_url=args.endpoint_url
    )
    return walked.chain, walked.stop


def _chain_error(error: ProbeError, images: list[ImageInfo]) -> str:
    """The chain's error in the command line's words: the library's names its
    ``allow_probe`` keyword, where here it is ``--allow-probe``."""
    last = images[-1]
    if isinstance(error, BackingFormatNotSpecified) and last.backing is not None:
        return (
            f"format of {last.filename} was probed, not recorded by its parent, and it has a backing file "
            f"({last.backing.name}); pass --allow-probe to follow it"
        )
    return error.reason


def _scan(args: argparse.Namespace) -> int:
    if args.to is not None:
        return _inventory(args)
    if is_url(args.directory):
        return _scan_objects(args)
    from .scan import scan_map

    try:
        entries = scan_map(
            args.directory, _scan_renderer(args), recursive=args.recursive, jobs=args.jobs, quote=_scan_quote(args)
        )
    except ProbeError as exc:
        _complain(args.directory, exc.reason)
        return EXIT_PROBE
    shown = _progress(entries, args)
    out = sys.stdout
    if args.output == "xml":
        from .volume_xml import scan_document_parts

        out.writelines(scan_document_parts(shown))
    elif args.jsonl:
        for count, line in enumerate(shown, 1):
            out.write(line)
            if count % SCAN_FLUSH == 0:
                out.flush()  # lines go out as they are made, a batch at a time
    else:
        from .jsontext import write_array

        write_array(shown, out)
    return EXIT_OK


def _inventory(args: argparse.Namespace) -> int:
    """``scan --to``: the inventory written, its summary on stdout."""
    from contextlib import nullcontext

    from .fleet import BATCH, CONCURRENCY, InventoryError, dask_client, fleet_scan

    try:
        with dask_client(args.dask or None, workers=args.jobs) if args.dask is not None else nullcontext() as client:
            inventory = fleet_scan(
                args.directory, args.to, client=client, since=args.since, to_format=args.to_format,
                batch_size=args.batch or BATCH, recursive=args.recursive, endpoint_url=args.endpoint_url,
                concurrency=args.concurrency or CONCURRENCY,
            )
    except ProbeError as exc:
        _complain(args.directory, exc.reason)
        return EXIT_PROBE
    except InventoryError as exc:
        _complain(exc.subject, exc.reason)
        return EXIT_PROBE
    summary = {
        "inventory": inventory.to, "format": inventory.to_format, "parts": len(inventory.parts),
        "records": inventory.records, "probed": inventory.probed, "carried": inventory.carried,
        "errors": inventory.errors,
    }
    print(json.dumps(summary, indent=4))
    return EXIT_OK


def _scan_objects(args: argparse.Namespace) -> int:
    """``scan URL``: every object under the prefix, its record written (in key order) as its probe ends."""
    from .objectscan import DEFAULT_CONCURRENCY, ObjectRecord, object_json, scan_objects

    render: Callable[[ObjectRecord], str]
    if args.output == "xml":
        render = _scan_renderer(args)  # type: ignore[assignment]
    elif args.jsonl:
        render = lambda record: json.dumps(object_json(record)) + "\n"  # noqa: E731
    else:
        from .jsontext import indented

        render = lambda record: indented(object_json(record), 1)  # noqa: E731
    records = scan_objects(
        args.directory, concurrency=args.concurrency or DEFAULT_CONCURRENCY, endpoint_url=args.endpoint_url
    )
    out = sys.stdout
    try:
        if args.output == "xml":
            from .volume_xml import scan_document_parts

            out.writelines(scan_document_parts(map(render, records)))
        elif args.jsonl:
            for record in records:
                out.write(render(record))
                out.flush()
        else:
            from .jsontext import write_array

            write_array(map(render, records), out)
    except ProbeError as exc:  # the prefix cannot be listed
        _complain(args.directory, exc.reason)
        return EXIT_PROBE
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


def _scan_quote(args: argparse.Namespace) -> Callable[[str], str] | None:
    """How the scan's text writes a volume's name, for the fast path of plain
    volumes (see storprobe.plain); None for XML, which shows more of a volume's status."""
    if args.output == "xml":
        return None
    from json.encoder import encode_basestring_ascii  # what json.dumps and jsontext write strings with

    return encode_basestring_ascii


def _progress(entries: Iterator[str], args: argparse.Namespace) -> Iterable[str]:
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
    from .safety import DEFAULT_MAX_VIRTUAL_SIZE, Policy, check, names

    policy = Policy(
        allow_formats=None if args.allow is None else frozenset(args.allow),
        allow_backing=args.allow_backing, allow_data_file=args.allow_data_file,
        max_virtual_size=DEFAULT_MAX_VIRTUAL_SIZE if args.max_size is None else args.max_size,
        backing_dirs=tuple(args.allow_backing_in), backing_protocols=names(args.allow_backing_protocol),
        data_file_dirs=tuple(args.allow_data_file_in),
    )
    if args.stream:
        return _check_stream(args, policy)
    try:
        verdict = check(args.path, policy=policy, format=args.format, endpoint_url=args.endpoint_url)
    except ProbeError as exc:
        _complain(args.path, exc.reason)
        return EXIT_PROBE
    info = verdict.info
    fmt, encryption = (info.format, info.encryption) if info else (None, None)
    return _report_check(args, verdict.path, fmt, encryption, verdict.hazards)


def _report_check(
    args: argparse.Namespace, path: str, fmt: str | None, encryption: str | None, hazards: tuple[Hazard, ...],
    *, note: str = "", stream: StreamVerdict | None = None,
) -> int:
    """Print a check's verdict (safe when there is no hazard); its exit status."""
    if args.output == "json":
        out: dict[str, Any] = {
            "filename": path,
            "safe": not hazards,
            "format": fmt,
            "encryption": encryption,
            "hazards": [{"check": h.check, "message": h.message} for h in hazards],
        }
        if stream is not None:
            out["stream"] = {"state": stream.state, "consumed": stream.consumed}
        print(json.dumps(out, indent=4))
    else:
        what = "unreadable header" if fmt is None else fmt + (f", encrypted ({encryption})" if encryption else "")
        print(f"{path}: {'UNSAFE' if hazards else 'safe'} ({what}{note})")
        for hazard in hazards:
            print(f"{hazard.check}: {hazard.message}")
    return EXIT_UNSAFE if hazards else EXIT_OK


def _check_stream(args: argparse.Namespace, policy: Policy) -> int:
    """``check --stream``: read PATH (``-``: standard input) once, front to
    back, feeding a stream inspector; stop reading at an early rejection."""
    from .stream import UNDETERMINED, StreamInspector

    name = "<stdin>" if args.path == "-" else args.path
    try:
        inspector = StreamInspector(args.format, size=args.stream_size, policy=policy, name=name)
        with open(sys.stdin.fileno() if args.path == "-" else args.path, "rb", closefd=args.path != "-") as stream:
            verdict = inspector.verdict()
            while not verdict.rejected:
                chunk = stream.read1(STREAM_CHUNK)
                verdict = inspector.feed(chunk) if chunk else inspector.finish()
                if not chunk:
                    break
    except OSError as exc:
        _complain(name, exc.strerror or str(exc))
        return EXIT_PROBE
    except ProbeError as exc:
        _complain(name, exc.reason)
        return EXIT_PROBE
    if verdict.state == UNDETERMINED:
        if args.output == "json":
            out: dict[str, Any] = {"filename": name, "safe": None, "format": verdict.format, "encryption": None,
                                   "hazards": [],
                   "stream": {"state": verdict.state, "consumed": verdict.consumed, "needed": verdict.needed}}
            print(json.dumps(out, indent=4))
        else:
            print(f"{name}: UNDETERMINED ({verdict.format or 'format unknown'}): {verdict.reason}")
        return EXIT_UNDETERMINED
    if verdict.result is not None:  # the whole stream was read
        info = verdict.result.info
        fmt, encryption = (info.format, info.encryption) if info else (None, None)
        return _report_check(args, name, fmt, encryption, verdict.hazards, stream=verdict)
    note = f"; {verdict.reason}, after {verdict.consumed} bytes: reading stopped"
    return _report_check(args, name, verdict.format, None, verdict.hazards, note=note, stream=verdict)


def _verify(args: argparse.Namespace) -> int:
    from .verify import EXIT_FAILED, EXIT_NO_CHECK, NoCheck, to_human, to_json, verify

    try:
        report = verify(args.path, format=args.format, max_size=args.max_size, named_files=_extent_files())
    except NoCheck as exc:
        _complain(args.path, exc.reason)
        return EXIT_NO_CHECK
    except ProbeError as exc:
        _complain(args.path, exc.reason)
        return EXIT_FAILED
    sys.stdout.write(to_json(report) if args.output == "json" else to_human(report))
    if report.exit_status == EXIT_FAILED:  # errors while checking: the report stands, the check failed
        _complain(args.path, "Check failed")
    return report.exit_status


def _map(args: argparse.Namespace) -> int:
    from .qemu_map import human_lines, json_lines

    try:
        with _open_guest(args.path, args.format, args.no_backing, args.max_size, max_depth=args.max_depth) as disk:
            statuses = disk.block_status()
            lines = json_lines(statuses, compressed=args.compressed) if args.output == "json" else human_lines(statuses)
            for line in lines:
                sys.stdout.write(line)
    except ProbeError as exc:
        sys.stdout.flush()
        _complain(args.path, exc.reason)
        return EXIT_PROBE
    return EXIT_OK


def _open_guest(
    path: str, format: str | None, no_backing: bool, max_size: int | None = None, *, max_depth: int | None = None
) -> GuestDisk:
    """The guest disk of ``path``, through its recorded local backing chain
    (as qemu-img reads it) or, with ``no_backing``, alone; ``max_size`` and
    ``max_depth`` as given (None: the data path's defaults)."""
    from .chain import DEFAULT_MAX_DEPTH
    from .datapath import ALONE, LOCAL, open_image
    from .safety import DEFAULT_MAX_VIRTUAL_SIZE

    return open_image(
        path, format, backing=ALONE if no_backing else LOCAL,
        max_depth=DEFAULT_MAX_DEPTH if max_depth is None else max_depth,
        max_size=DEFAULT_MAX_VIRTUAL_SIZE if max_size is None else max_size,
    )


def _extent_files() -> BackingPolicy:
    """The files an image names for its own data (a VMDK descriptor's extents), opened as qemu-img opens them."""
    from .datapath import LOCAL

    return LOCAL


def _inspect(args: argparse.Namespace) -> int:
    from .guest import inspect_disk

    try:
        with _open_guest(args.path, args.format, args.no_backing, args.max_size) as disk:
            report = inspect_disk(disk)
    except ProbeError as exc:
        _complain(args.path, exc.reason)
        return EXIT_PROBE
    if args.output == "json":
        from .qemu_json import guest_json

        print(json.dumps({"filename": args.path, **guest_json(report)}, indent=4))
    else:
        from .human import render_guest, shown

        print(f"image: {shown(args.path)}\n{render_guest(report)}")
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    """qemu-img compare's lines on stdout (none with -q) and its exit status."""
    from .compare import OPEN_FAILED, CompareError, compare

    disks: list[GuestDisk] = []
    try:
        for path, format in ((args.first, args.format), (args.second, args.second_format)):
            try:
                disks.append(_open_guest(path, format, args.no_backing, args.max_size))
            except ProbeError as exc:
                _complain(path, exc.reason)
                return OPEN_FAILED
        try:
            outcome = compare(disks[0], disks[1], strict=args.strict)
        except CompareError as exc:
            _complain(exc.filename, exc.reason)
            return exc.status
    finally:
        for disk in disks:
            disk.close()
    if not args.quiet:
        print("\n".join(outcome.lines))
    return outcome.status


def _convert(args: argparse.Namespace) -> int:
    from .convert import DestinationError, WriteError, convert_to_raw

    try:
        with _open_guest(args.source, args.format, args.no_backing, args.max_size) as disk:
            convert_to_raw(disk, args.destination, overwrite=args.overwrite)
    except DestinationError as exc:
        _complain(args.destination, exc.reason)
        return EXIT_PROBE
    except WriteError as exc:
        _complain("write error", exc.error.strerror or str(exc.error))
        return EXIT_PROBE
    except ProbeError as exc:
        _complain(args.source, exc.reason)
        return EXIT_PROBE
    return EXIT_OK


def _measure(args: argparse.Namespace) -> int:
    """qemu-img measure's answer on stdout, or its refusal (status 1)."""
    from .human import shown
    from .measure import MeasureError, image_size, measure, secret_id, to_human, to_json

    source = args.source[0] if args.source else None
    try:
        if args.output not in ("human", "json"):
            raise MeasureError("--output must be used with human or json as argument.", code="measure.usage")
        size = None if args.size is None else image_size(args.size)
        secrets = [secret_id(text) for text in args.objects]
        if len(args.source) > 1:
            raise MeasureError("At most one filename argument is allowed.", code="measure.usage")
        result = measure(
            args.target, args.options, size=size, source=source, source_format=args.format,
            backing=_top_only() if args.no_backing else None, secrets=secrets, max_size=args.max_size,
        )
    except MeasureError as refused:
        for report in refused.reports:
            first, *hints = report.split("\n")
            print("\n".join([f"storprobe: {shown(first)}", *map(shown, hints)]), file=sys.stderr)
        return EXIT_PROBE
    except ProbeError as exc:
        _complain(source or "", exc.reason)
        return EXIT_PROBE
    sys.stdout.write(to_json(result) if args.output == "json" else to_human(result))
    return EXIT_OK


def _top_only() -> BackingPolicy:
    from .datapath import ALONE

    return ALONE


def _validate(args: argparse.Namespace) -> int:
    """``FILE: valid`` or ``FILE: invalid`` on stdout, then each reason on
    stderr as ``storprobe: FILE:LINE: element NAME: why`` (virt-xml-validate's
    words); a file that cannot be read is one error line. Status 1 unless all are valid."""
    from .human import shown
    from .validate import invalid_reasons

    status = EXIT_OK
    for name in args.files:
        try:
            document = _document(name)
        except OSError as exc:
            _complain(name, exc.strerror or str(exc))
            status = EXIT_PROBE
            continue
        reasons = invalid_reasons(document)
        print(f"{shown(name)}: {'invalid' if reasons else 'valid'}")
        for reason in reasons:
            _complain(f"{name}:{reason.line}" if reason.line else name, str(reason._replace(line=None)))
        if reasons:
            status = EXIT_PROBE
    return status


def _document(name: str) -> bytes:
    """The document ``name`` (``-``: standard input), up to one byte more
    than the largest accepted (so that "too large" can be told)."""
    from .validate import MAX_DOCUMENT

    if name != "-":
        with open(name, "rb") as f:
            return f.read(MAX_DOCUMENT + 1)
    if sys.stdin is None:  # descriptor 0 closed
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    return sys.stdin.buffer.read(MAX_DOCUMENT + 1)


def _printable(magic: bytes) -> str:
    """Magic bytes as text with escapes for the unprintable ones: ``QFI\\xfb``."""
    return repr(magic)[2:-1]


def _formats(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = [
        {
            "name": row.spec.name,
            "description": row.spec.description,
            "magic": " | ".join(_printable(m) for m in row.spec.magics) or None,
            "magic-offset": row.spec.magic_offset if row.spec.magic is not None else None,
            "header-offsets": list(row.spec.header_offsets),
            "extension": row.spec.extension,
            "versions": list(row.spec.versions),
            "qemu-driver": row.spec.driver(None),
            "qemu-version-drivers": {str(v): d for v, d in row.spec.qemu_version_drivers.items()},
            "plugin": row.plugin,
        }
        for row in format_table().rows
    ]
    if args.output == "json":
        print(json.dumps(rows, indent=4))
        return EXIT_OK
    print(f"{'FORMAT':<11}{'MAGIC':<28}{'OFFSET':>7}  {'VERSIONS':<22}{'QEMU DRIVER':<14}{'PLUGIN'}")
    for row in rows:
        magic = row["magic"] or "-"
        magic = magic if len(magic) <= 26 else magic[:23] + "..."
        offset = "-" if row["magic-offset"] is None else str(row["magic-offset"])
        if row["header-offsets"] != [0]:
            offset += "@" + ",".join(str(o) for o in row["header-offsets"])
        versions = ",".join(hex(v) if v > 9 else str(v) for v in row["versions"]) or "-"
        driver = ",".join([row["qemu-driver"], *(f"v{v}:{d}" for v, d in row["qemu-version-drivers"].items())])
        print(f"{row['name']:<11}{magic:<28}{offset:>7}  {versions:<22}{driver:<14}{row['plugin']}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. Whatever happens to standard output
    there is no traceback: a failed write (a full disk, descriptor 1 closed)
    is one line ``storprobe: write error: REASON`` and status 1, and a reader
    that went away (EPIPE) ends the command quietly."""
    stdout = sys.stdout
    sys.stdout = _Output(stdout)
    try:
        try:
            status = _run(argv)
        except SystemExit as exc:  # argparse's --help, --version and usage errors
            status = exc.code if isinstance(exc.code, int) else EXIT_USAGE
        sys.stdout.flush()  # a last write error shows here, not at interpreter exit
    except PluginError as broken:  # a plugin's rows cannot make a format table: no command can run
        _complain("plugin error", str(broken))
        return EXIT_PROBE
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


def run() -> None:
    """The ``storprobe`` command as a process (its console script, ``python -m
    storprobe``): :func:`main`, then the end of the process without Python's
    teardown, which frees every object of every module one at a time (a tenth
    of a short command's time) only for the kernel to free the whole process
    after it. What the teardown does that matters still happens: exit handlers
    run and standard streams are flushed. With another thread still running,
    the process ends as usual (the interpreter waits for it)."""
    gc.freeze()  # what start-up made lives to the end: no collection walks it again
    status = main()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # main has reported its own output's failure; nothing to add
            pass
    threading = sys.modules.get("threading")  # no thread was started without it
    if threading is not None and threading.active_count() > 1:
        sys.exit(status)
    os._exit(status)


def _run(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(words[0] if words and words[0] in _COMMANDS else None)  # no option before it: no top-level help
    args, unknown = parser.parse_known_args(argv)
    command = parser.commands[args.command]
    if unknown:
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    for useless in _useless_options(args):
        command.error(useless)
    _, run_command = _COMMANDS[args.command]
    return run_command(args)


def _useless_options(args: argparse.Namespace) -> Iterator[str]:
    """Options given where they would do nothing: each is a usage error, not silence."""
    if args.command == "check" and args.stream_size is not None and not args.stream:
        yield "--stream-size applies only with --stream"
    if args.command == "info" and args.inspect_guest and args.output == "xml":
        yield "--inspect-guest applies to --output human and json, not xml"
    if args.command == "info" and args.allocated and args.output == "xml":
        yield "--allocated applies to --output human and json, not xml (the volume's <allocation> is its disk usage)"
    if args.command == "info" and args.allocated and is_url(args.path):
        yield "--allocated reads local files, not objects at a URL"
    if args.command == "info" and not args.backing_chain:
        for given, option in ((args.allow_probe, "--allow-probe"), (args.max_depth is not None, "--max-depth")):
            if given:
                yield f"{option} applies only with --backing-chain"
    if args.command == "measure" and args.max_size is not None and not args.source:
        yield "--max-size bounds the virtual size of a SRC read; it does not apply to --size"
    if args.command == "map" and args.compressed and args.output != "json":
        yield f"--compressed is a JSON key; it does not apply to --output {args.output}"
    if args.command == "scan" and args.jsonl and args.output != "json":
        yield f"--jsonl is a JSON shape; it does not apply to --output {args.output}"
    target = getattr(args, "directory" if args.command == "scan" else "path", None)
    named = (target, getattr(args, "to", None), getattr(args, "since", None))  # a scan's inventories may be URLs
    if getattr(args, "endpoint_url", None) is not None and not any(is_url(name) for name in named):
        yield "--endpoint-url applies only to a URL"
    if args.command == "scan" and args.concurrency is not None and not is_url(target):
        yield "--concurrency applies only to a URL (a directory's scan takes --jobs)"
    if args.command == "scan" and is_url(target) and getattr(args, "to", None) is None:
        for given, option in ((args.jobs is not None, "--jobs"), (args.recursive, "--recursive")):
            if given:
                yield f"{option} applies only to a directory (a prefix's scan takes --concurrency; it lists every key)"
    if args.command == "info" and args.backing_in_store and not (args.backing_chain and is_url(target)):
        yield "--backing-in-store applies only with --backing-chain and a URL"
    if getattr(args, "output", None) == "xml" and is_url(target):
        yield "--output xml is libvirt's volume XML, which describes local volumes, not objects at a URL"
    if args.command == "scan":
        yield from _useless_scan_options(args)


def _useless_scan_options(args: argparse.Namespace) -> Iterator[str]:
    """``scan``'s options that shape stdout, the cluster or the inventory, where they would do nothing."""
    if args.to is None:
        for given, option in (
            (args.dask is not None, "--dask"), (args.since is not None, "--since"),
            (args.batch is not None, "--batch"), (args.to_format != "parquet", "--to-format"),
        ):
            if given:
                yield f"{option} applies only with --to (an inventory)"
        return
    for given, option in ((args.output != "json", "--output"), (args.jsonl, "--jsonl")):
        if given:
            yield f"{option} shapes records on stdout; with --to they go into the inventory"
    if args.jobs is not None and args.dask != "":
        yield "--jobs with --to is the number of workers of --dask's LocalCluster (given no SCHEDULER)"
    if args.recursive and is_url(args.directory):
        yield "--recursive applies only to a directory (a prefix's listing holds every key under it)"


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


#: Each command, in the order the help lists them: what declares its arguments,
#: and what runs it (to its exit status).
_COMMANDS: dict[str, tuple[Callable[[_Commands], None], Callable[[argparse.Namespace], int]]] = {
    "info": (_declare_info, _info),
    "scan": (_declare_scan, _scan),
    "check": (_declare_check, _check),
    "verify": (_declare_verify, _verify),
    "map": (_declare_map, _map),
    "inspect": (_declare_inspect, _inspect),
    "compare": (_declare_compare, _compare),
    "convert": (_declare_convert, _convert),
    "measure": (_declare_measure, _measure),
    "validate": (_declare_validate, _validate),
    "formats": (_declare_formats, _formats),
}

if __name__ == "__main__":
    run()
