"""The format table: built-ins, third-party plugins, conflicts, caching."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import storprobe
from storprobe import FormatSpec, hookimpl, probe
from storprobe.backing import LAYER_DRIVERS
from storprobe.errors import InvalidFormatSpec, PluginConflict
from storprobe.registry import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, format_table
from storprobe.source import HEAD_SIZE

ROOT = Path(__file__).resolve().parent.parent


def test_builtin_tuple_matches_declared_entry_points():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert dict(BUILTIN_PLUGINS) == declared


def test_every_builtin_module_lives_in_plugins_dir():
    for _, module in BUILTIN_PLUGINS:
        assert (ROOT / "plugins" / (module.rsplit(".", 1)[1] + ".py")).is_file()


def test_table_has_every_builtin_format_once():
    names = format_table().names()
    assert len(names) == len(set(names))
    assert {n for n, _ in BUILTIN_PLUGINS} <= set(names)


def test_catch_alls_come_last():
    specs = format_table().specs
    assert [s.name for s in specs[-2:]] == ["dir", "raw"]


#: String literals in the core that spell a format name but mean something else.
NOT_FORMATS = {
    ("volume_xml.py", "dir"): "libvirt's volume type for a directory",
    ("volume_xml.py", "qcow"): "libvirt's <encryption format> for qcow/qcow2 AES",
    ("backing.py", "dir"): "the json: option of QEMU's vvfat driver naming the host directory",
    ("cli.py", "raw"): "qemu-img's output format for convert and measure: the guest's bytes as they are, no row",
    ("measure.py", "raw"): "qemu-img measure's default output format (-O), as in its own code",
}


def test_core_names_no_format():
    """No string literal in the core (storprobe/) is a format name, but the
    list of built-in plugin modules: the core special-cases no format."""
    names = {n for n, _ in BUILTIN_PLUGINS}
    for path in (ROOT / "storprobe").glob("*.py"):
        if path.name == "registry.py":
            continue
        literals = {
            node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        named = {n for n in literals & names if (path.name, n) not in NOT_FORMATS}
        if path.name == "backing.py":  # QEMU's own driver names, the json: layers above a protocol node
            named -= LAYER_DRIVERS
        assert not named, f"{path.name} names format(s) {named}"


def _imported_modules(tree: ast.AST) -> list[tuple[str, int]]:
    """(module, level) of every import statement of a module's AST: ``import a.b``
    is ("a.b", 0), ``from .x import y`` ("x", 1), ``from . import y`` ("y", 1)."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                found.append((node.module, node.level))
            else:
                found += [(alias.name, node.level) for alias in node.names]
    return found


def test_no_plugin_imports_another_plugin():
    """A built-in depends on the core only (anything another row needs lives in
    storprobe/), so a third-party plugin can replace any of them: no plugin module
    imports storprobe_plugins (by name, relatively, or by a string for importlib)."""
    package = "storprobe_plugins"
    for path in sorted((ROOT / "plugins").glob("*.py")):
        tree = ast.parse(path.read_text())
        imports = _imported_modules(tree)
        assert imports or path.name == "__init__.py", f"{path.name}: no imports found, the walk is broken"
        wrong = [f"{'.' * level}{module}" for module, level in imports
                 if level or module == package or module.startswith(package + ".")]
        wrong += [node.value for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and package in node.value]
        assert not wrong, f"plugins/{path.name} imports another plugin module: {wrong}"


def test_records_import_nothing_of_the_table():
    """storprobe.model (ImageInfo and the records in it) imports no storprobe module
    when it runs (only names for the type checker): the table's row type imports it,
    never the other way round, so the two cannot form a cycle."""
    tree = ast.parse((ROOT / "storprobe" / "model.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            assert not [m for m, _ in _imported_modules(node) if m in ("spec", "registry", "detect")]
            node.body = []  # what the type checker alone imports
    imports = _imported_modules(tree)
    assert imports
    assert not [module for module, level in imports if level or module.startswith("storprobe")]


def test_plugin_import_check_sees_every_spelling():
    """The check above finds each way a plugin could reach another one."""
    for source in ("from storprobe_plugins.raw import x", "import storprobe_plugins.luks",
                   "from . import raw", "from .raw import x", "from storprobe_plugins import raw"):
        modules = _imported_modules(ast.parse(source))
        assert any(level or module.startswith("storprobe_plugins") for module, level in modules), source


class Tagged:
    """A third-party format: 8 bytes 'STORTEST', version u16 LE at 8, size u32 LE at 12."""

    @hookimpl
    def storprobe_formats(self):
        return [
            FormatSpec(
                name="stortest",
                description="test format",
                magic=b"STORTEST",
                version_offset=8,
                version_width=2,
                versions=(7,),
                size_offset=12,
                size_width=4,
                size_multiplier=512,
            )
        ]


def test_registered_plugin_is_detected_without_core_change():
    data = b"STORTEST" + (7).to_bytes(2, "little") + b"\0\0" + (8).to_bytes(4, "little") + bytes(100)
    assert probe(data).format == "raw"
    with storprobe.registered(Tagged(), name="tagged"):
        info = probe(data)
        assert (info.format, info.virtual_size, info.version) == ("stortest", 4096, 7)
        assert "stortest" in format_table()
    assert probe(data).format == "raw"
    assert "stortest" not in format_table()


def test_unknown_version_of_a_registered_format_is_reported_not_raw():
    data = b"STORTEST" + (8).to_bytes(2, "little") + bytes(100)
    with storprobe.registered(Tagged(), name="tagged"):
        with pytest.raises(storprobe.UnsupportedVersion) as err:
            probe(data)
    assert err.value.format == "stortest" and err.value.version == 8


def test_duplicate_format_names_conflict_at_load():
    class Impostor:
        @hookimpl
        def storprobe_formats(self):
            return [FormatSpec(name="qcow2", magic=b"NOTQCOW2")]

    with storprobe.registered(Impostor(), name="impostor"):
        with pytest.raises(PluginConflict, match="qcow2"):
            format_table()
    assert format_table()["qcow2"].magic == b"QFI\xfb"


class OneRow:
    """A throwaway plugin providing one row."""

    def __init__(self, row) -> None:
        self.row = row

    @hookimpl
    def storprobe_formats(self):
        return [self.row]


def _match(img) -> bool:
    return False


BAD = dict(name="badrow", magic=b"BADROW")


@pytest.mark.parametrize(
    "row, reason",
    [
        (FormatSpec(**BAD, version_offset=6), "version_offset 6 with no versions"),
        (FormatSpec(**BAD, versions=(1,)), "versions without a version_offset"),
        (FormatSpec(**BAD, version_offset=6, version_width=0, versions=(1,)), "version_width 0 is not 1..8"),
        (FormatSpec(**BAD, version_offset=-2, versions=(1,)), "version_offset -2 is negative"),
        (FormatSpec(**BAD, size_offset=8, size_width=9), "size_width 9 is not 1..8"),
        (FormatSpec(**BAD, size_offset=HEAD_SIZE - 4), f"size field at {HEAD_SIZE - 4} (8 bytes) lies beyond"),
        (FormatSpec(**BAD, size_offset=-8), "size_offset -8 is negative"),
        (FormatSpec(**BAD, size_offset=8, size_multiplier=0), "size_multiplier 0"),
        (FormatSpec(**BAD, header_offsets=(-512,), size_offset=508), "size field at 508 (8 bytes) lies beyond the 512"),
        (FormatSpec(**BAD, crypt_offset=8), "crypt_offset 8 with no crypt_methods"),
        (FormatSpec(**BAD, crypt_methods={1: "aes"}), "crypt_methods without a crypt_offset"),
        (FormatSpec(**BAD, crypt_offset=8, crypt_width=16, crypt_methods={1: "aes"}), "crypt_width 16"),
        (FormatSpec(**BAD, crypt_offset=8, crypt_methods={0: "none"}), "crypt_methods maps 0"),
        (FormatSpec(**BAD, magic_offset=-1), "magic_offset -1 is negative"),
        (FormatSpec(name="badrow", magic=b""), "magic must be non-empty"),
        (FormatSpec(name="badrow", magic=()), "magic must be non-empty"),
        (FormatSpec(**BAD, magic_offset=HEAD_SIZE), "magic at"),
        (FormatSpec(**BAD, header_offsets=()), "header_offsets must name"),
        (FormatSpec(**BAD, endian="="), "endian must be"),  # type: ignore[arg-type]
        (FormatSpec(**BAD, file_types=frozenset({"socket"})), "file_types"),  # type: ignore[arg-type]
        (FormatSpec(name="badrow", match_prefixes=(b"X",)), "match_prefixes gate a match callback"),
        (FormatSpec(**BAD, version_offset=6, versions=(1,), qemu_version_drivers={2: "raw"}), "versions [2]"),
        (FormatSpec(name="", magic=b"BADROW"), "name must be"),
        ("badrow", "returned str 'badrow', not a FormatSpec"),
    ],
)
def test_a_row_that_cannot_work_is_refused_at_load(row, reason):
    """A row no probe could use is a plugin error when the table is built, naming
    the plugin and the row and saying why; not a failure of every later probe."""
    plugin = OneRow(row)
    with storprobe.registered(plugin, name="throwaway"):
        with pytest.raises(InvalidFormatSpec) as err:
            format_table()
    message = str(err.value)
    assert "'throwaway'" in message and reason in message
    if isinstance(row, FormatSpec) and row.name:
        assert f"format {row.name!r}" in message
    assert probe(b"BADROW" + bytes(100)).format == "raw"  # the table is whole again without it


@pytest.mark.parametrize("command", [["formats"], ["info", "-"], ["scan", "."]])
def test_a_broken_plugin_is_one_line_on_the_command_line(command, capsys):
    """Every command needs the table: a plugin that cannot make one is a named
    error (``storprobe: plugin error: ...``, status 1), never a traceback."""
    from storprobe.cli import main

    with storprobe.registered(OneRow(FormatSpec(name="badrow", version_offset=4)), name="throwaway"):
        status = main(command)
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("storprobe: plugin error: ") and err.count("\n") == 1
    assert "'throwaway'" in err and "Traceback" not in err


def test_the_crypt_field_has_a_width():
    """``crypt_width`` is read like the size and version fields: a 2-byte big-endian method."""
    row = FormatSpec(name="crypted", magic=b"CRYPTED!", endian=">", crypt_offset=8, crypt_width=2,
                     crypt_methods={0x0102: "aes"})
    with storprobe.registered(OneRow(row), name="crypted"):
        assert probe(b"CRYPTED!\x01\x02\xff\xff" + bytes(100)).encryption == "aes"
        assert probe(b"CRYPTED!\x00\x00\xff\xff" + bytes(100)).encryption is None
        assert probe(b"CRYPTED!\x00\x07\xff\xff" + bytes(100)).encryption == "unknown-7"


def test_match_is_asked_only_after_its_declared_prefixes():
    """A row with a ``match`` callback and ``match_prefixes`` is decided by the
    signature index: the callback sees only volumes whose header starts with a
    prefix; without prefixes it sees every volume."""
    asked: list[bytes] = []

    def match(img) -> bool:
        asked.append(img.header[:4])
        return img.header.startswith(b"TXT:ok")

    class Texty:
        def __init__(self, prefixes: tuple[bytes, ...]) -> None:
            self.prefixes = prefixes

        @hookimpl
        def storprobe_formats(self):
            return [FormatSpec(name="texty", match=match, match_prefixes=self.prefixes)]

    volumes = [b"TXT:ok" + bytes(50), b"TXT:no" + bytes(50), b"QFI" + bytes(60), bytes(64)]
    with storprobe.registered(Texty((b"TXT:",)), name="texty"):
        assert [probe(v).format for v in volumes] == ["texty", "raw", "raw", "raw"]
    assert asked == [b"TXT:", b"TXT:"]
    asked.clear()
    with storprobe.registered(Texty(()), name="texty"):
        assert [probe(v).format for v in volumes] == ["texty", "raw", "raw", "raw"]
    assert asked == [v[:4] for v in volumes]


def test_extension_only_format():
    class ByName:
        @hookimpl
        def storprobe_formats(self):
            return [FormatSpec(name="byname", extension=".byname")]

    with storprobe.registered(ByName(), name="byname"):
        assert probe(storprobe.BytesSource(b"x" * 10, name="a.byname")).format == "byname"
        assert probe(storprobe.BytesSource(b"x" * 10, name="a.other")).format == "raw"


def _fake_distribution(tmp_path: Path) -> Path:
    """A third-party package as pip would install it: a module plus dist-info."""
    site = tmp_path / "site"
    (site / "storprobe_tagged").mkdir(parents=True)
    (site / "storprobe_tagged" / "__init__.py").write_text(
        "from storprobe import FormatSpec, hookimpl\n"
        "@hookimpl\n"
        "def storprobe_formats():\n"
        "    return [FormatSpec(name='tagged', magic=b'TAGGEDFMT', size_offset=9, size_width=2)]\n"
    )
    info = site / "storprobe_tagged-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: storprobe-tagged\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntagged = storprobe_tagged\n")
    return site


@pytest.mark.parametrize(
    "env, expected",
    [({}, "tagged"), ({"STORPROBE_DISABLE_PLUGIN_AUTOLOAD": "1"}, "raw"), ({"STORPROBE_PLUGINS": "other"}, "raw"),
     ({"STORPROBE_PLUGINS": "tagged"}, "tagged")],
)
def test_installed_entry_point_plugin(tmp_path, env, expected):
    site = _fake_distribution(tmp_path)
    image = tmp_path / "img"
    image.write_bytes(b"TAGGEDFMT" + (300).to_bytes(2, "little") + bytes(50))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STORPROBE_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-m", "storprobe", "info", "--output", "json", str(image)],
        capture_output=True, text=True, env={**clean, **env},
    )
    assert proc.returncode == 0, proc.stderr
    assert f'"format": "{expected}"' in proc.stdout
    if expected == "tagged":
        assert '"virtual-size": 300' in proc.stdout
