"""``storprobe validate``: ``FILE: valid`` / ``FILE: invalid`` on stdout, each
reason on stderr with its line, in virt-xml-validate's words (libxml2's: the
type that refused the value), and ``-`` for standard input."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from oracle import qemu_img_create, require

STORPROBE = [sys.executable, "-m", "storprobe"]
#: virt-xml-validate's (xmllint's) located reason: FILE:LINE: element NAME: Relax-NG validity error : WHY
LOCATED = re.compile(r"(?P<file>.+?):(?P<line>\d+): element (?P<element>\S+): Relax-NG validity error : (?P<why>.*)")


@pytest.fixture(scope="module")
def volume_xml(tmp_path_factory) -> str:
    image = qemu_img_create(tmp_path_factory.mktemp("validate") / "a.qcow2", "qcow2", "1G")
    return subprocess.run([*STORPROBE, "info", "--output", "xml", str(image)], capture_output=True, text=True,
                          check=True).stdout


def test_standard_input_is_dash(volume_xml):
    proc = subprocess.run([*STORPROBE, "validate", "-"], input=volume_xml, capture_output=True, text=True)
    assert (proc.stdout, proc.stderr, proc.returncode) == ("-: valid\n", "", 0)
    bad = subprocess.run([*STORPROBE, "validate", "-"], input=volume_xml.replace(">1073741824<", ">-5<"),
                         capture_output=True, text=True)
    assert (bad.stdout, bad.returncode) == ("-: invalid\n", 1)
    assert "storprobe: -:4: element capacity: Type unsignedLong doesn't allow value '-5'\n" in bad.stderr


def test_a_closed_standard_input_is_an_error():
    closed = ["bash", "-c", '"$@" <&-', "bash", *STORPROBE, "validate", "-"]
    proc = subprocess.run(closed, capture_output=True, text=True)
    assert (proc.stdout, proc.stderr, proc.returncode) == ("", "storprobe: -: Bad file descriptor\n", 1)


BROKEN = {
    "capacity": (">1073741824<", ">-5<", "4: element capacity: Type unsignedLong doesn't allow value '-5'"),
    "unit": ('<capacity unit="bytes">', '<capacity unit="parsecs">',
             "4: element capacity: Invalid attribute unit for element capacity"),
    "owner": ("<owner>0</owner>", "<owner>-7</owner>", "12: element owner: Type unsignedInt doesn't allow value '-7'"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_reasons_are_virt_xml_validates_with_their_lines(volume_xml, tmp_path, case):
    """Each reason virt-xml-validate (with libvirt's schema) gives with a line
    is ours too, word for word, but its "Invalid sequence in interleave":
    libvirt's schema nests the sizes in an interleave of their own, ours does
    not. Where libxml2 says only that an element did not fit an interleave,
    we also name the cause inside it (the owner's -7)."""
    old, new, cause = BROKEN[case]
    path = tmp_path / f"{case}.xml"
    path.write_text(volume_xml.replace(old, new))
    theirs = subprocess.run([require("virt-xml-validate"), str(path), "storagevol"], capture_output=True, text=True)
    assert theirs.returncode != 0
    located = [LOCATED.fullmatch(line) for line in theirs.stderr.splitlines()]
    expected = [f"storprobe: {m['file']}:{m['line']}: element {m['element']}: {m['why']}"
                for m in located if m and m["why"] != "Invalid sequence in interleave"]
    proc = subprocess.run([*STORPROBE, "validate", str(path)], capture_output=True, text=True)
    assert (proc.stdout, proc.returncode) == (f"{path}: invalid\n", 1)
    ours = proc.stderr.splitlines()
    assert expected and all(line in ours for line in expected), (expected, ours)
    assert f"storprobe: {path}:{cause}" in ours


def test_a_document_that_is_not_xml_is_invalid(tmp_path):
    path = tmp_path / "junk.xml"
    path.write_text("<volume><name>x</volume>")
    proc = subprocess.run([*STORPROBE, "validate", str(path)], capture_output=True, text=True)
    assert (proc.stdout, proc.returncode) == (f"{path}: invalid\n", 1)
    assert proc.stderr.startswith(f"storprobe: {path}: not well-formed XML: ")


def test_a_file_that_cannot_be_read_is_one_error_line(tmp_path):
    proc = subprocess.run([*STORPROBE, "validate", str(tmp_path / "missing.xml")], capture_output=True, text=True)
    assert (proc.stdout, proc.returncode) == ("", 1)
    assert proc.stderr == f"storprobe: {tmp_path / 'missing.xml'}: No such file or directory\n"
