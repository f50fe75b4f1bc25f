"""What a command pays for before it probes anything: the built-in formats load
without a plugin manager (pluggy, and the ``inspect`` it imports, load only when
a plugin is registered), through marks pluggy reads as its own, into the same
table. (Start-up time itself is measured by benchmarks/bench_scan.py, never
asserted here.)"""

from __future__ import annotations

import subprocess
import sys

import pluggy
import pytest

from storprobe import hookimpl
from storprobe.hookspecs import PROJECT, hookspec
from storprobe.registry import _Registry


def test_hookimpl_marks_as_pluggy_marks():
    def ours():
        pass

    def theirs():
        pass

    hookimpl(ours)
    pluggy.HookimplMarker(PROJECT)(theirs)
    assert ours.storprobe_impl == theirs.storprobe_impl
    options = {"tryfirst": True, "specname": "storprobe_formats", "optionalhook": True}
    hookimpl(**options)(ours)
    pluggy.HookimplMarker(PROJECT)(**options)(theirs)
    assert ours.storprobe_impl == theirs.storprobe_impl


def test_hookspec_marks_as_pluggy_marks():
    def ours():
        pass

    def theirs():
        pass

    hookspec(ours)
    pluggy.HookspecMarker(PROJECT)(theirs)
    assert ours.storprobe_spec == theirs.storprobe_spec


def test_built_ins_make_the_same_table_with_and_without_a_plugin_manager():
    direct = _Registry()
    without = direct.table()
    assert direct.pm is None
    managed = _Registry()
    managed.plugin_manager()
    through = managed.table()
    assert [(row.spec, row.plugin) for row in without.rows] == [(row.spec, row.plugin) for row in through.rows]
    assert without.builtin_only and through.builtin_only
    assert without.windows == through.windows and without.unindexed == through.unindexed


@pytest.mark.parametrize("command", [["scan", "{empty}"], ["scan", "{empty}", "--jsonl"], ["formats"]])
def test_a_command_with_built_in_formats_alone_imports_no_plugin_manager(tmp_path, command):
    code = (
        "import sys\nfrom storprobe.cli import main\n"
        f"status = main({[arg.format(empty=str(tmp_path)) for arg in command]!r})\n"
        "print(sorted(m for m in ('pluggy', 'inspect') if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(status)"
    )
    env = {"STORPROBE_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert proc.stderr.strip().splitlines()[-1] == "[]"


#: What probing never needs: the data path, verify, measure and the partition tables (the
#: plugins import them inside the callbacks that use them), and a plugin manager.
NOT_FOR_A_SCAN = ("storprobe.blockmap", "storprobe.verify", "storprobe.measure", "storprobe.partitions", "pluggy")


def test_a_scan_of_qcow2_images_loads_no_data_path(tmp_path):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1G"], check=True)
    code = (
        "import sys\nfrom storprobe.cli import main\n"
        f"status = main(['scan', {str(tmp_path)!r}])\n"
        f"print(sorted(m for m in {NOT_FOR_A_SCAN!r} if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(status)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert '"format": "qcow2"' in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "[]"


def test_the_data_path_loads_when_a_callback_needs_it(tmp_path):
    """The other side of the lazy imports: map, verify and measure still work from a fresh process."""
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    for command in (["map", "--output", "json"], ["verify", "--output", "json"], ["measure", "-O", "qcow2"]):
        proc = subprocess.run([sys.executable, "-m", "storprobe", *command, str(image)], capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stderr)
