"""storprobe measure against qemu-img measure (QEMU 7.2): the same JSON text, the
same human lines, and the same refusals (qemu-img's words after ``storprobe: ``,
status 1), for virtual sizes across qcow2's creation options and for sources:
sparse raw files, qcow2 images written by qemu-io (data, zero, compressed
clusters), backing chains and persistent bitmaps."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storprobe.cli import main
from storprobe.datapath import IGNORE
from storprobe.measure import MeasureError, Measurement, measure, option_list, to_human, to_json

from oracle import qemu_img_create, qemu_info, require, run

CLUSTER_SIZES = [1 << bits for bits in range(9, 22)]
REFCOUNT_BITS = [1, 2, 4, 8, 16, 32, 64]
PREALLOCATION = ["off", "metadata", "falloc", "full"]
SIZES = [0, 1, 511, 512, 513, 65535, 65537, 10**9 + 7, 1 << 30, (1 << 30) + 1, 1 << 40, 16 << 40]


def qemu_measure(*args: str | Path, output: str = "json") -> subprocess.CompletedProcess:
    """``qemu-img measure`` however it ends."""
    cmd = [require("qemu-img"), "measure", f"--output={output}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def storprobe_measure(capsys: pytest.CaptureFixture[str], *args: str | Path) -> subprocess.CompletedProcess:
    """The command, run in this process (its start-up is most of its time): status, stdout, stderr."""
    capsys.readouterr()
    status = main(["measure", *map(str, args)])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out, err)


def qemu_answer(*args: str | Path) -> str:
    """qemu-img's JSON, or its error reports without the program's name."""
    proc = qemu_measure(*args)
    if proc.returncode == 0:
        return proc.stdout
    assert proc.returncode == 1 and not proc.stdout, proc
    return proc.stderr.replace("qemu-img: ", "")


def our_answer(target: str, options: list[str], **where: object) -> str:
    try:
        return to_json(measure(target, options, **where))  # type: ignore[arg-type]
    except MeasureError as refused:
        return "".join(report + "\n" for report in refused.reports)


def option_args(options: list[str]) -> list[str]:
    return [arg for option in options for arg in ("-o", option)]


def assert_size_agrees(target: str, size: int, options: list[str]) -> None:
    ours = our_answer(target, options, size=size)
    assert ours == qemu_answer("-O", target, "--size", str(size), *option_args(options)), (target, size, options)


def qemu_io(path: Path, *commands: str) -> None:
    run("qemu-io", *[arg for command in commands for arg in ("-c", command)], path)


# ---- --size: the target's arithmetic --------------------------------------------------------------


@pytest.mark.parametrize("extended_l2", [False, True])
@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
def test_qcow2_size_grid(cluster_size, extended_l2):
    """Every size with two (refcount width, preallocation) pairs that rotate over
    the sizes, so each width and mode meets each cluster size; sizes that need
    more L1 entries than QEMU allows are its refusal, too small clusters for
    extended L2 too."""
    if extended_l2 and cluster_size < 16384:  # refused whatever the size
        assert_size_agrees("qcow2", 1 << 30, [f"cluster_size={cluster_size}", "extended_l2=on"])
        return
    for i, size in enumerate(SIZES):
        for j in range(2):
            refcount = REFCOUNT_BITS[(i + 3 * j) % len(REFCOUNT_BITS)]
            options = [f"cluster_size={cluster_size}", f"refcount_bits={refcount}",
                       f"preallocation={PREALLOCATION[(i + j) % len(PREALLOCATION)]}",
                       f"extended_l2={'on' if extended_l2 else 'off'}"]
            assert_size_agrees("qcow2", size, options)


@pytest.mark.parametrize("size", [*SIZES, 2**62 + 1, 2**63 - 1])
def test_raw_size(size):
    """raw: the size in whole sectors (2**63 - 1 rounds up past int64, as QEMU's unsigned sum does)."""
    assert_size_agrees("raw", size, [])
    assert_size_agrees("raw", size, ["preallocation=full"])


@pytest.mark.parametrize("options", [
    [], ["compat=0.10"], ["compat=1.1"], ["lazy_refcounts=on"], ["compression_type=zstd"],
    ["data_file=/nonexistent", "data_file_raw=on"], ["backing_file=/nonexistent", "backing_fmt=qcow2"],
    ["encryption=on"], ["encrypt.format=aes"], ["nocow=on", "extent_size_hint=1M"], ["id=x"],
    ["extended_l2"], ["noextended_l2"], ["cluster_size=4k", "cluster_size=2M"], ["cluster_size=4k,refcount_bits=1"],
    ["size=1T"], ["cluster_size=0x1000"], ["refcount_bits=0x20"], ["refcount_bits=010"], ["cluster_size=1.5k"],
    ["extended_l2=yes"], ["extended_l2=n"],
])
def test_qcow2_options_qemu_ignores_or_reads(options):
    """Options that change nothing in the count are accepted, the last value of
    an option wins, flags and number syntaxes read as QEMU reads them."""
    assert_size_agrees("qcow2", 1 << 30, options)


@pytest.mark.parametrize("options", [
    ["foo=1"], ["help"], ["cluster_size=abc"], ["cluster_size=1000"], ["cluster_size=256"], ["cluster_size=4M"],
    ["cluster_size=0"], ["cluster_size=18446744073709551616"], ["cluster_size=64k,,x"], ["refcount_bits=3"],
    ["refcount_bits=0"], ["refcount_bits=128"], ["refcount_bits=x"], ["refcount_bits=18446744073709551616"],
    ["refcount_bits=-1"], ["compat=0.10,refcount_bits=8"], ["compat=2"], ["preallocation=bogus"],
    ["extended_l2=maybe"], ["extended_l2=on,cluster_size=8k"], ["lazy_refcounts=x"], ["nocow=2"],
    ["encrypt.iter-time=abc"], ["cluster_size=512", "size=1P"], ["cow"],
])
def test_qcow2_refusals(options):
    assert_size_agrees("qcow2", 1 << 30, options)


@pytest.mark.parametrize("options", [["cluster_size=64k"], ["preallocation=bogus"], ["size=x"], ["nocow=on"]])
def test_raw_options(options):
    assert_size_agrees("raw", 12345, options)


def test_option_list_syntax():
    assert option_list(["a=1,b=x,,y", "c", "nod"]) == (("a", "1"), ("b", "x,y"), ("c", "on"), ("d", "off"))
    assert option_list(["a=,b="]) == (("a", ""), ("b", ""))
    for bad in ["", ",a=1", "a=1,", "a=1,,,"]:
        with pytest.raises(MeasureError, match="Invalid option list"):
            option_list([bad])
    assert option_list(["a=1,,"]) == (("a", "1,"),)


@settings(max_examples=60)
@given(
    size=st.integers(0, 1 << 48),
    cluster_bits=st.integers(9, 21),
    refcount_order=st.integers(0, 6),
    extended_l2=st.booleans(),
    preallocation=st.sampled_from(PREALLOCATION),
)
def test_qcow2_size_property(size, cluster_bits, refcount_order, extended_l2, preallocation):
    options = [f"cluster_size={1 << cluster_bits}", f"refcount_bits={1 << refcount_order}",
               f"extended_l2={'on' if extended_l2 else 'off'}", f"preallocation={preallocation}"]
    assert_size_agrees("qcow2", size, options)


# ---- the command: its output and its refusals -----------------------------------------------------


@pytest.mark.parametrize("args", [
    ["-O", "qcow2", "--size", "1G"],
    ["-O", "qcow2", "--size", "1.5G", "-o", "cluster_size=2M", "-o", "refcount_bits=64"],
    ["--size", "0x1000"],
    ["-O", "raw", "--size", "1E"],
])
@pytest.mark.parametrize("output", ["human", "json"])
def test_command_output(args, output, capsys):
    ours = storprobe_measure(capsys, "--output", output, *args)
    qemu = qemu_measure(*args, output=output)
    assert (ours.returncode, ours.stdout, ours.stderr) == (0, qemu.stdout, "")


@pytest.mark.parametrize("args", [
    [],
    ["--size", "1G", "a.img"],
    ["-f", "raw", "--size", "1G"],
    ["a.img", "b.img"],
    ["--size", "1G", "--output", "xml"],
    ["--size", "1G", "-O", "nonesuch"],
    ["--size", "1G", "-O", "vmdk"],
    ["--size", "-1"],
    ["--size", "abc"],
    ["--size", "1.5"],
    ["--size", "9223372036854775808"],
    ["--size", "8E"],
    ["--size", "1G", "-o", ""],
    ["--size", "1G", "-o", "cluster_size=4k,"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k", "-o", "bogus=1"],
])
def test_command_refusals(args, capsys):
    """What qemu-img refuses, refused in its words, with its status (1)."""
    ours = storprobe_measure(capsys, *args)
    qemu = qemu_measure(*args, output="human")
    assert qemu.returncode == 1
    assert (ours.returncode, ours.stdout) == (1, "")
    assert ours.stderr == qemu.stderr.replace("qemu-img: ", "storprobe: ")


#: Formats QEMU reads but cannot create: it says so ("Format driver 'bochs' does not support
#: image creation"); a row holds no fact of creation, so storprobe says it measures nothing.
READ_ONLY_IN_QEMU = {"bochs", "cloop", "dmg"}


def test_every_format_name(capsys):
    """-O with each row's name: measured where QEMU measures, else refused with
    QEMU's words (a row whose QEMU driver has another name is unknown to QEMU)."""
    from storprobe import format_table

    for name in format_table().names():
        if name == "luks":
            continue  # measured in test_luks_targets (each qemu-img run takes seconds)
        args = ["-O", name, "--size", "1M"]
        ours, qemu = storprobe_measure(capsys, *args), qemu_measure(*args, output="human")
        assert (ours.returncode, ours.stdout) == (qemu.returncode, qemu.stdout), name
        if name in READ_ONLY_IN_QEMU:
            assert ours.stderr == f"storprobe: Block driver '{name}' does not support size measurement\n"
        else:
            assert ours.stderr == qemu.stderr.replace("qemu-img: ", "storprobe: "), name


def test_renderers_key_order():
    """With bitmaps, qemu-img's JSON lists them first (its dictionary's order)."""
    assert to_json(Measurement(1, 2, 3)).splitlines()[1:4] == ['    "bitmaps": 3,', '    "required": 1,',
                                                              '    "fully-allocated": 2']
    assert to_human(Measurement(1, 2, 3)) == "required size: 1\nfully allocated size: 2\nbitmaps size: 3\n"


# ---- sources: what the source's guest disk holds ----------------------------------------------------


TARGETS = [
    ["-O", "raw"],
    ["-O", "qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=512"],
    ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
    ["-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on"],
    ["-O", "qcow2", "-o", "compat=0.10"],
    ["-O", "qcow2", "-o", "preallocation=metadata,cluster_size=16k"],
    ["-O", "qcow2", "-o", "preallocation=full"],
    ["-O", "qcow2", "-o", "backing_file=/nonexistent"],
]


def assert_source_agrees(source: Path, *extra: str) -> None:
    for target in TARGETS:
        args = [*target, *extra, source]
        fmt, options = args[1], [a for i, a in enumerate(args) if i and args[i - 1] == "-o"]
        source_format = args[args.index("-f") + 1] if "-f" in args else None
        ours = our_answer(str(fmt), options, source=source, source_format=source_format)
        assert ours == qemu_answer(*args), (target, source)


RAW_WRITES = {
    "empty": [],
    "first-byte": [(0, 1)],
    "scattered": [(4096 * 100, 12288), (5_000_000, 10), (7 * 65536 - 1, 2)],
    "unaligned-tail": [(9_999_990, 10)],
    "dense": [(0, 3 << 20)],
}


@pytest.mark.parametrize("length", [10 << 20, (10 << 20) + 1000])
@pytest.mark.parametrize("writes", RAW_WRITES.values(), ids=RAW_WRITES.keys())
def test_sparse_raw_source(tmp_path, writes, length):
    """A raw file's data is what SEEK_DATA finds: clusters its data touches count."""
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(length)
        for offset, size in writes:
            f.seek(offset)
            f.write(os.urandom(size))
    assert_source_agrees(path)


def qcow2_script(kind: str, cluster: int, *, compressed: bool) -> list[str]:
    """qemu-io writes: data, zeros (``-z``, ``-zu``), a discard, a compressed
    cluster where the image can take one, at cluster-aligned or odd offsets."""
    c = cluster
    if kind == "empty":
        return []
    if kind == "odd-offsets":
        script = ["write -P 9 3584 1k", "write -P 9 1000448 512", "write -P 9 19M 700"]
    else:
        script = ["write -P 1 0 1M", "write -z 2M 1M", "write -zu 6M 128k", "write -P 4 7M 1k", "discard 0 64k"]
    return script + ([f"write -c -P 7 {8 << 20} {c}"] if compressed else [])


@pytest.mark.parametrize("create", [
    ["cluster_size=64k"], ["cluster_size=512"], ["cluster_size=2M"], ["cluster_size=64k,extended_l2=on"],
    ["compat=0.10"], ["cluster_size=4k,preallocation=metadata"],
])
@pytest.mark.parametrize("kind", ["data-zero-compressed", "odd-offsets", "empty"])
def test_qcow2_source(tmp_path, create, kind):
    path = qemu_img_create(tmp_path / "src.qcow2", "qcow2", "20M", *create)
    cluster = int(qemu_info(path)["cluster-size"])
    qemu_io(path, *qcow2_script(kind, cluster, compressed=not any("preallocation" in c for c in create)))
    assert_source_agrees(path)


def test_backing_chain_source(tmp_path):
    """Data anywhere in the chain counts; the top's zeros hide the backing's data;
    a top larger than its backing reads zeros past the backing's end."""
    base = qemu_img_create(tmp_path / "base.qcow2", "qcow2", "20M", "cluster_size=4k")
    qemu_io(base, "write -P 1 0 1M", "write -P 2 5M 1M", "write -c -P 3 9M 64k", "write -P 5 19M 1M")
    middle = tmp_path / "middle.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", middle, "20M")
    qemu_io(middle, "write -z 5M 512k", "write -P 6 12M 100k")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", middle, "-F", "qcow2", "-o", "cluster_size=512", top, "32M")
    qemu_io(top, "write -P 7 3000 5000", "write -z 0 512", "write -P 8 25M 64k")
    raw_base = tmp_path / "base.raw"
    run("qemu-img", "convert", "-O", "raw", base, raw_base)
    over_raw = tmp_path / "over-raw.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", raw_base, "-F", "raw", over_raw, "24M")
    qemu_io(over_raw, "write -P 1 22M 1M")
    for image in (middle, top, over_raw):
        assert_source_agrees(image)


def test_no_backing_reads_the_top_alone(tmp_path):
    """--no-backing: what QEMU counts with the backing left out (``backing: null``)."""
    base = qemu_img_create(tmp_path / "base.qcow2", "qcow2", "8M")
    qemu_io(base, "write -P 1 0 4M")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "8M")
    qemu_io(top, "write -P 2 6M 64k")
    alone = f'json:{{"driver": "qcow2", "backing": null, "file": {{"driver": "file", "filename": "{top}"}}}}'
    for options in (["cluster_size=4k"], []):
        assert our_answer("qcow2", options, source=top, backing=IGNORE) == qemu_answer(
            "-O", "qcow2", *option_args(options), alone)
        assert our_answer("qcow2", options, source=top) != our_answer("qcow2", options, source=top, backing=IGNORE)


@pytest.mark.parametrize("bitmaps", [
    [],
    [("b0", None)],
    [("b0", None), ("a-much-longer-bitmap-name-to-grow-the-directory", "512"), ("g", "2147483648")],
    [(f"bm{i}", "4096") for i in range(12)],
])
@pytest.mark.parametrize("size", ["20M", "12345678"])
def test_bitmaps(tmp_path, bitmaps, size):
    """The source's persistent bitmaps, each whole in the new image, with its
    table and its directory entry; no ``bitmaps`` from a v2 target or source."""
    path = qemu_img_create(tmp_path / "src.qcow2", "qcow2", size)
    qemu_io(path, "write -P 1 0 64k")
    for name, granularity in bitmaps:
        run("qemu-img", "bitmap", "--add", *(["-g", granularity] if granularity else []), path, name)
    assert_source_agrees(path)


def test_v2_source_has_no_bitmaps(tmp_path):
    path = qemu_img_create(tmp_path / "v2.qcow2", "qcow2", "20M", "compat=0.10")
    assert "bitmaps" not in our_answer("qcow2", [], source=path)
    assert_source_agrees(path)


@pytest.mark.parametrize("args", [
    ["-O", "qcow2", "-o", "cluster_size=4k"],
    ["-O", "raw"],
])
@pytest.mark.parametrize("output", ["human", "json"])
def test_command_source_output(tmp_path, args, output, capsys):
    path = qemu_img_create(tmp_path / "src.qcow2", "qcow2", "20M")
    qemu_io(path, "write -P 1 1M 3M")
    run("qemu-img", "bitmap", "--add", path, "b0")
    ours = storprobe_measure(capsys, "--output", output, *args, path)
    qemu = qemu_measure(*args, path, output=output)
    assert (ours.returncode, ours.stdout, ours.stderr) == (0, qemu.stdout, "")


def test_source_refusals(tmp_path, capsys):
    """A source qemu-img cannot open (a missing backing file, an encrypted image)
    is refused by both (status 1); the source's errors come before the target's."""
    base = qemu_img_create(tmp_path / "base.qcow2", "qcow2", "8M")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "8M")
    base.unlink()
    encrypted = tmp_path / "aes.qcow2"  # crypt_method 1 (AES): QEMU wants a key to open it
    data = bytearray(qemu_img_create(tmp_path / "plain.qcow2", "qcow2", "8M").read_bytes())
    data[32:36] = (1).to_bytes(4, "big")
    encrypted.write_bytes(data)
    for source in (top, encrypted, tmp_path / "nonexistent"):
        for target in (["-O", "qcow2"], ["-O", "nonesuch"]):
            assert qemu_measure(*target, source).returncode == 1
            ours = storprobe_measure(capsys, *target, source)
            assert (ours.returncode, ours.stdout) == (1, "")
            assert ours.stderr.startswith(f"storprobe: {source}: "), ours.stderr


def test_installed_command(tmp_path):
    """The installed ``storprobe measure`` prints what ``qemu-img measure`` prints."""
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(5 << 20)
        f.seek(3 << 20)
        f.write(b"data")
    for output in ("human", "json"):
        args = ["-O", "qcow2", "-f", "raw", "-o", "cluster_size=4k", str(path)]
        ours = subprocess.run([require("storprobe"), "measure", "--output", output, *args], capture_output=True,
                              text=True, check=False)
        assert (ours.returncode, ours.stdout, ours.stderr) == (0, qemu_measure(*args, output=output).stdout, "")


# ---- encrypted targets: the LUKS1 header QEMU would write -------------------------------------------


SECRET = ["--object", "secret,id=s0,data=never-read"]


def test_luks_targets(tmp_path):
    """The header's size follows the master key (cipher, XTS doubles it); qcow2
    rounds it up to a cluster. qemu-img creates the header to measure it (seconds
    of key-derivation benchmark each), so two oracles, run side by side, cover the
    arithmetic; the other key sizes are checked below against luks' own sums."""
    source = tmp_path / "src.raw"
    with open(source, "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 5000)
    cases = [  # a 48-byte XTS key (serpent-192) over a source; a 16-byte CBC key in 2 MiB clusters
        ["-O", "luks", "-o", "key-secret=s0,cipher-alg=serpent-192,ivgen-alg=essiv,ivgen-hash-alg=sha256", source],
        ["-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=twofish-128,"
         "encrypt.cipher-mode=cbc,cluster_size=2M,preallocation=metadata", "--size", str(10**9)],
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda args: qemu_answer(*SECRET, *args), cases))
    for args, qemu in zip(cases, answers, strict=True):
        fmt, options = str(args[1]), [str(args[3])]
        where = {"size": int(args[5])} if "--size" in args else {"source": args[4]}
        assert our_answer(fmt, options, secrets=["s0"], **where) == qemu, args


@pytest.mark.parametrize("target", ["luks", "qcow2"])
@pytest.mark.parametrize("options", [
    [], ["key-secret=s1"], ["key-secret=s0,cipher-alg=foo"], ["key-secret=s0,hash-alg=x,cipher-mode=y"],
    ["key-secret=s0,cipher-alg=des"], ["key-secret=s0,cipher-alg=3des,cipher-mode=cbc"],
    ["key-secret=s0,cipher-alg=cast5-128"], ["key-secret=s0,cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv"],
    ["key-secret=s0,ivgen-alg=essiv,ivgen-hash-alg=sha1"],
    ["key-secret=s0,cipher-alg=twofish-192,ivgen-alg=essiv,ivgen-hash-alg=sha512"],
    ["key-secret=s0,ivgen-hash-alg=md6"], ["key-secret=s0,iter-time=abc"],
])
def test_luks_refusals(target, options):
    """QEMU's refusals of LUKS creation options, in its words (the qcow2 target's
    options carry ``encrypt.``, its messages only where QEMU's do)."""
    if target == "qcow2":
        options = ["encrypt.format=luks" + "".join(f",encrypt.{o}" for o in ",".join(options).split(",") if o)]
    ours = our_answer(target, options, size=1 << 20, secrets=["s0"])
    assert ours == qemu_answer(*SECRET, "-O", target, "--size", "1M", *option_args(options))


@pytest.mark.parametrize("objects", [
    ["secret,data=x"], ["iothread,id=x"], ["secret,id=s0,file=/nonexistent/never-read", "secret,id=s1,data=x"],
])
def test_objects(objects, capsys):
    """--object: only secrets, each with an id; their values are never read."""
    args = [arg for text in objects for arg in ("--object", text)]
    ours = storprobe_measure(capsys, *args, "-O", "luks", "-o", "key-secret=s1", "--size", "1")
    if objects[0].startswith("secret,id"):
        assert (ours.returncode, ours.stderr) == (0, "")
        assert ours.stdout == "required size: 2068481\nfully allocated size: 2068481\n"
    else:
        assert (ours.returncode, ours.stdout) == (1, "")
        assert ours.stderr.startswith("storprobe: ")


@pytest.mark.parametrize("cipher, mode, key_bytes", [
    ("aes-128", "cbc", 16), ("aes-256", "xts", 64), ("cast5-128", "ctr", 16), ("serpent-256", "ecb", 32),
    ("twofish-192", "xts", 48),
])
def test_luks_header_sizes(cipher, mode, key_bytes):
    """The header QEMU writes: 4 KiB, then eight slots of 4000 stripes of the
    master key, each padded to 4 KiB (QEMU's layout, which test_luks_targets
    holds to qemu-img)."""
    slot = -(-key_bytes * 4000 // 4096) * 4096
    ours = measure("luks", [f"key-secret=s0,cipher-alg={cipher},cipher-mode={mode}"], size=7, secrets=["s0"])
    assert ours == Measurement(4096 + 8 * slot + 7, 4096 + 8 * slot + 7)


L1_OFFSET_FIELD, TABLE_OFFSET_MASK, COPIED = 40, 0x00FFFFFFFFFFFE00, 1 << 63


@pytest.mark.parametrize("broken", ["data-cluster-unaligned", "l2-table-unaligned"])
def test_broken_tables(tmp_path, broken, capsys):
    """A table QEMU finds corrupt fails its block status: both refuse to count
    the data (status 1, ours a named error), and both measure -O raw, which
    needs no block status, alike."""
    path = qemu_img_create(tmp_path / "src.qcow2", "qcow2", "10M")
    qemu_io(path, "write -P 1 0 64k")
    data = bytearray(path.read_bytes())
    l1 = int.from_bytes(data[L1_OFFSET_FIELD : L1_OFFSET_FIELD + 8], "big")
    l2 = int.from_bytes(data[l1 : l1 + 8], "big") & TABLE_OFFSET_MASK
    if broken == "data-cluster-unaligned":
        data[l2 : l2 + 8] = (COPIED | 0x1200).to_bytes(8, "big")
    else:
        data[l1 : l1 + 8] = (COPIED | 0x1234200).to_bytes(8, "big")
    path.write_bytes(data)
    assert qemu_measure("-O", "qcow2", path).returncode == 1
    ours = storprobe_measure(capsys, "-O", "qcow2", path)
    assert (ours.returncode, ours.stdout) == (1, "")
    assert ours.stderr.startswith(f"storprobe: {path}: ") and "unaligned" in ours.stderr
    raw = storprobe_measure(capsys, "--output", "json", "-O", "raw", path)
    assert (raw.returncode, raw.stdout) == (0, qemu_measure("-O", "raw", path).stdout)


def test_qcow_v1_source(tmp_path):
    """Any format the data path reads is a source: QEMU's qcow (version 1), data
    and a compressed cluster."""
    path = qemu_img_create(tmp_path / "src.qcow", "qcow", "20M")
    qemu_io(path, "write -P 1 0 1M", "write -P 2 5M 3000", "write -c -P 3 10M 4k")
    assert_source_agrees(path)


@pytest.mark.parametrize("length", [0, 1, 511, 513])
def test_tiny_raw_source(tmp_path, length):
    """A file shorter than a sector is a disk of whole sectors (none when empty)."""
    path = tmp_path / "tiny.raw"
    path.write_bytes(b"x" * length)
    assert_source_agrees(path)


@settings(max_examples=25)
@given(
    length=st.integers(1, 4 << 20),
    writes=st.lists(st.tuples(st.integers(0, 4 << 20), st.integers(1, 70000)), max_size=6),
    cluster_bits=st.integers(9, 21),
)
def test_sparse_raw_property(tmp_path_factory, length, writes, cluster_bits):
    """Data anywhere in a sparse file, any target cluster size: the clusters touched."""
    path = tmp_path_factory.mktemp("sparse") / "src.raw"
    with open(path, "wb") as f:
        f.truncate(length)
        for offset, size in writes:
            f.seek(offset)
            f.write(b"\xa5" * size)
    options = [f"cluster_size={1 << cluster_bits}"]
    assert our_answer("qcow2", options, source=path) == qemu_answer("-O", "qcow2", *option_args(options), path)
