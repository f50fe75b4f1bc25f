"""Coverage-guided fuzzing of every plugin with atheris (libFuzzer for Python).

    python3 -m pip install atheris
    python3 tests/fuzz_atheris.py WORKDIR -max_len=4194304 -max_total_time=3600

WORKDIR is libFuzzer's corpus directory; when it is empty it is seeded with the
regression corpus (tests/corpus, decompressed). Each input is probed and
checked; anything but a result or a named error (a ``plugin-error``, any other
exception) stops the run and leaves the input in ``crash-*``: fix the plugin,
then add the input to tests/corpus. ``-max_len`` must cover what a format
reads (ISO descriptors lie past 32 KiB, a qemu-img VHDX's metadata at 3 MiB);
real images copied into WORKDIR make better seeds than the corpus alone.
"""

from __future__ import annotations

import lzma
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import storprobe
    from storprobe.safety import check

    storprobe.format_table()  # imports (and so instruments) the built-in plugins

CORPUS = Path(__file__).resolve().parent / "corpus"


def test_one_input(data: bytes) -> None:
    try:
        storprobe.probe(data)
    except storprobe.ProbeError as exc:
        if exc.code == "plugin-error":
            raise
    for hazard in check(data).hazards:
        if "(plugin-error)" in hazard.message:
            raise AssertionError(hazard.message)


def seed(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        return
    for path in CORPUS.glob("*.xz"):
        (workdir / path.stem).write_bytes(lzma.decompress(path.read_bytes()))


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        seed(Path(sys.argv[1]))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
