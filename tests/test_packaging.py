"""The wheel, built offline as a packager builds it: our three packages and nothing with a
generic name, the licence, the type markers, and tqdm as an extra the scan does without."""

from __future__ import annotations

import email
import os
import pty
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: The first setuptools that reads ``project.license`` as an SPDX expression (PEP 639); older
#: ones refuse a plain-string licence, so the build needs at least this one.
SETUPTOOLS_WITH_LICENSE_EXPRESSIONS = Version("77.0")


def setuptools_requirement() -> Requirement:
    (requirement,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    return requirement


def test_build_requires_a_setuptools_that_reads_the_license_field():
    assert isinstance(PYPROJECT["project"]["license"], str)
    (lowest,) = [s.version for s in setuptools_requirement().specifier if s.operator == ">="]
    assert Version(lowest) >= SETUPTOOLS_WITH_LICENSE_EXPRESSIONS


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel pip builds with the setuptools installed here, without an index."""
    if not setuptools_requirement().specifier.contains(setuptools.__version__):
        pytest.fail(f"setuptools {setuptools.__version__} cannot build us: pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", out, ROOT],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("storprobe-*.whl")
    return zipfile.ZipFile(path)


def dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.split("/")[0].endswith(".dist-info") and n.endswith("/" + name)]
    return wheel.read(path).decode()


def test_wheel_top_level_names_and_entry_points(wheel):
    names = wheel.namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"storprobe", "storprobe_plugins", "storprobe_schemas"}
    assert "storprobe_plugins/qcow2.py" in names
    text = dist_info(wheel, "entry_points.txt")
    assert "[storprobe.formats]" in text and "qcow2 = storprobe_plugins.qcow2" in text
    assert "storprobe = storprobe.cli:run" in text


def test_wheel_carries_the_license_and_type_markers(wheel):
    names = wheel.namelist()
    assert "storprobe/py.typed" in names and "storprobe_plugins/py.typed" in names
    assert dist_info(wheel, "LICENSE") == (ROOT / "LICENSE").read_text()
    metadata = email.message_from_string(dist_info(wheel, "METADATA"))
    assert metadata["License-Expression"] == PYPROJECT["project"]["license"] == "MIT"
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert metadata.get_all("Classifier") == PYPROJECT["project"]["classifiers"]
    assert "Typing :: Typed" in metadata.get_all("Classifier")


def test_tqdm_is_an_extra(wheel):
    metadata = email.message_from_string(dist_info(wheel, "METADATA"))
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    tqdm = [r for r in requires if r.name == "tqdm"]
    assert tqdm and all(r.marker is not None and "extra" in str(r.marker) for r in tqdm)
    assert "progress" in metadata.get_all("Provides-Extra")


def test_a_watched_scan_without_tqdm_has_no_bar_and_the_same_output(tmp_path):
    """Where a progress bar would be drawn (stderr a terminal, stdout not) but tqdm cannot be
    imported, the scan writes what it writes with tqdm, and nothing on the terminal."""
    for name in ("a.img", "b.img"):
        (tmp_path / name).write_bytes(bytes(4096))
    without_tqdm = "import sys; sys.modules['tqdm'] = None; from storprobe.cli import main; sys.exit(main())"
    main, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-c", without_tqdm, "scan", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=terminal, text=True)
        os.close(terminal)
        on_terminal = b""
        while chunk := _read(main):
            on_terminal += chunk
    finally:
        os.close(main)
    plain = subprocess.run([sys.executable, "-m", "storprobe", "scan", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, on_terminal.decode(errors="replace")
    assert on_terminal == b""
    assert proc.stdout == plain.stdout and '"format": "raw"' in proc.stdout


def _read(fd: int) -> bytes:
    """What a pty holds; EIO once the other side is closed and drained."""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""
