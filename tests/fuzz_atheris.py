"""Coverage-guided fuzzing of every plugin with atheris (libFuzzer for Python).

    python3 -m pip install atheris
    python3 tests/fuzz_atheris.py WORKDIR -max_len=4194304 -max_total_time=3600

WORKDIR is libFuzzer's corpus directory; when it is empty it is seeded with the
regression corpus (tests/corpus, decompressed) and the real images the pytest
fuzz tests mutate (made with qemu-img and friends). Each input is probed and
checked, and every result rendered as JSON, as text and as volume XML that
must validate (the property of tests/test_fuzz.py); anything but a result or
a named error (a ``plugin-error``, any other exception, a failed assertion)
stops the run and leaves the input in ``crash-*``: fix the plugin,
then add the input to tests/corpus. ``-max_len`` must cover what a format
reads (ISO descriptors lie past 32 KiB, a qemu-img VHDX's metadata at 3 MiB).
"""

from __future__ import annotations

import lzma
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import storprobe

    storprobe.format_table()  # imports (and so instruments) the built-in plugins

from builders import real_images  # noqa: E402  (shared with the pytest fuzz tests)
from oracle import probe_and_check  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "corpus"


def test_one_input(data: bytes) -> None:
    probe_and_check(data)


def seed(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        return
    for path in CORPUS.glob("*.xz"):
        (workdir / path.stem).write_bytes(lzma.decompress(path.read_bytes()))
    with tempfile.TemporaryDirectory() as made:
        for number, image in enumerate(real_images(Path(made))):
            (workdir / f"real-{number}").write_bytes(image)


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        seed(Path(sys.argv[1]))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
