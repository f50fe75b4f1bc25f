"""The wheel installs our two packages and nothing with a generic name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_top_level_names_and_entry_points(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path, ROOT],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("storprobe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"storprobe", "storprobe_plugins", "storprobe_schemas"}
    assert "storprobe_plugins/qcow2.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[storprobe.formats]" in text and "qcow2 = storprobe_plugins.qcow2" in text
    assert "storprobe = storprobe.cli:main" in text
