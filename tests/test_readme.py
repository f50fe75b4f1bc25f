"""Every code block of README.md runs, or is checked, here, so the README cannot drift.

- ```python blocks run, each alone in a fresh interpreter from the checkout (as a reader pastes
  one): a bare ``import storprobe`` must be enough for what a block names. The plugin example
  (its first line names its file) is written to that file, registered and made to detect the
  header its row describes; the ```toml block beside it must name the same module and group.
- The synopsis block (```, lines ``storprobe COMMAND ...``) lists the options, metavariables and
  choices of each subcommand's real ``--help`` usage line, no more and no fewer.
- ```sh blocks of "Set up a new machine": the test command is the one line ``.ci/run`` runs; the
  first command's storprobe steps run here (its venv and pip steps need the package index and
  a machine without the project: they were checked by hand in a new Debian 12 root); the recipe
  of the example images (the block that starts ``cd examples``) is run again, and what it makes
  must be what ``examples/`` holds.
- Any other ```sh block runs from the checkout with this interpreter as ``.venv/bin/python``
  (and ``python3``, ``pip``, ``storprobe``), except those in ``SKIPPED``, each with its reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest

from storprobe import probe
from storprobe.cli import _parser
from storprobe.qemu_json import EXTRA_KEY, to_qemu_json
from storprobe.registry import ENTRY_POINT_GROUP

from oracle import qemu_info

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SETUP_SECTION = "Set up a new machine"

#: ```sh blocks (by their first line's start) that the suite does not run, and why.
SKIPPED = {
    "STORPROBE_FUZZ=long": "a long fuzz campaign, 100000 examples per test: hours (the suite runs the default profile)",
    ".venv/bin/pip install atheris": "installs atheris from the package index, then fuzzes for an hour",
    ".venv/bin/pip install 'storprobe[remote]'": "needs an object store and the network: tests/test_remote.py runs "
    "info, check and scan against a moto S3 server and HTTP servers on loopback",
    ".venv/bin/storprobe scan /var/lib/libvirt/images --to": "a pool and a Dask scheduler that are not here: "
    "tests/test_fleet.py runs --dask on a LocalCluster and a scheduler of its own, over files and a moto S3 server",
    ".venv/bin/python tests/differential_campaign.py": "5000 images against qemu-img: minutes "
    "(tests/test_differential.py runs a fixed sample of 400 in the suite)",
}


class Block(NamedTuple):
    section: str  # the heading above it, without its #s
    lang: str
    text: str


def readme_blocks() -> list[Block]:
    blocks, section = [], ""
    for match in re.finditer(r"^(#+) ([^\n]*)$|^```(\w*)\n(.*?)^```$", README.read_text(), re.M | re.S):
        if match.group(1):
            section = match.group(2).strip()
        else:
            blocks.append(Block(section, match.group(3), match.group(4)))
    return blocks


BLOCKS = readme_blocks()


def blocks_of(lang: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang == lang]


TEST_COMMAND_START = "bash tests/setup-tools.sh "
RECIPE_START = "cd examples\n"


def setup_commands() -> tuple[str, str, str]:
    """The set-up section's main command (its first block), test command and examples' recipe."""
    setup = [b.text for b in BLOCKS if b.section == SETUP_SECTION and b.lang == "sh"]
    (tests,) = [t for t in setup if t.startswith(TEST_COMMAND_START)]
    (recipe,) = [t for t in setup if t.startswith(RECIPE_START)]
    return setup[0].strip(), tests.strip(), recipe


def is_setup_command(block: Block) -> bool:
    return block.text.strip() in setup_commands() or block.text.startswith(RECIPE_START)


def test_every_block_is_of_a_kind_this_file_checks():
    assert {b.lang for b in BLOCKS} <= {"sh", "python", "toml", ""}
    firsts = [b.text.split("\n", 1)[0] for b in blocks_of("sh")]
    for start in SKIPPED:
        assert any(f.startswith(start) for f in firsts), f"SKIPPED names no README block: {start}"
    assert all(b.text.startswith("storprobe ") for b in blocks_of("")), "a ``` block that is no synopsis"


# ---- Set up a new machine ----


def test_ci_runs_exactly_the_readme_test_command():
    _, tests, _ = setup_commands()
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in script if line and not line.startswith("#")]
    assert commands[:2] == ["set -euo pipefail", 'cd "$(dirname "$0")/.."']
    assert commands[2:] == [tests]


def test_set_up_commands_use_the_virtual_environment():
    """PEP 668: on Debian and Ubuntu the system python3 takes no pip install, so every pip,
    storprobe and pytest step runs from .venv, which the commands make."""
    main, tests, _ = setup_commands()
    for command in (main, tests):
        steps = command.split(" && ")
        assert any(s.lstrip("(").startswith("python3 -m venv .venv") for s in steps)
        for step in steps:
            words = shlex.split(step.lstrip("("))
            if "pip" in step or "pytest" in step or words[0].endswith("storprobe"):
                assert words[0].startswith(".venv/bin/"), step
    assert "apt-get" not in tests  # tests/setup-tools.sh installs python3-venv there
    assert "apt-get install -y python3-venv" in main.split("||", 1)[1]  # only when venv fails


def test_main_command_shows_the_examples_without_image_tools():
    """The storprobe steps of the first command, run by this interpreter."""
    main, _, _ = setup_commands()
    steps = [s for s in main.split(" && ") if s.startswith(".venv/bin/storprobe ")]
    assert steps
    for step in steps:
        args = shlex.split(step)[1:]
        proc = subprocess.run([sys.executable, "-m", "storprobe", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        if "--output=json" in args or "json" in args:
            assert json.loads(proc.stdout)


def facts(path: Path, made_in: Path) -> tuple[dict, dict]:
    """What qemu-img and storprobe say of an example image, less what differs between two
    runs of the recipe (where the image lies, the disk blocks it takes, VMDK's random CID)."""

    def strip(record: dict) -> dict:
        record = json.loads(json.dumps(record).replace(str(made_in) + "/", ""))
        record.pop("actual-size")
        data = record.get("format-specific", {}).get("data", {})
        data.pop("cid", None)
        for extent in data.get("extents", ()):
            extent.pop("actual-size", None)
        return record

    return strip(qemu_info(path)), strip(to_qemu_json(probe(path)))


def test_examples_are_what_their_recipe_makes(tmp_path):
    _, _, recipe = setup_commands()
    (tmp_path / "examples").mkdir()
    subprocess.run(["bash", "-euc", recipe], cwd=tmp_path, check=True)
    made = tmp_path / "examples"
    shipped = ROOT / "examples"
    assert sorted(p.name for p in made.iterdir()) == sorted(p.name for p in shipped.iterdir())
    for image in sorted(made.iterdir()):
        qemu_made, ours_made = facts(image, made)
        qemu_shipped, ours_shipped = facts(shipped / image.name, shipped)
        assert qemu_shipped == qemu_made, image.name
        assert ours_shipped == ours_made, image.name
        ours_shipped.pop(EXTRA_KEY)
        assert ours_shipped == qemu_shipped, image.name
    total = sum(p.stat().st_size for p in shipped.iterdir())
    assert total < 512 * 1024, f"examples/ holds {total} bytes: keep it a few hundred KiB"


# ---- Python API and plugins ----

PLUGIN_FILE = re.compile(r"# (\w+)/(\w+)\.py\n")


@pytest.mark.parametrize(
    "block", [b for b in blocks_of("python") if not PLUGIN_FILE.match(b.text)], ids=lambda b: b.section
)
def test_python_block_runs_alone(block):
    proc = subprocess.run([sys.executable, "-c", block.text], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_api_modules_load_when_first_named():
    """``import storprobe`` loads none of them (start-up time), and naming one loads it."""
    check = textwrap.dedent("""
        import sys, storprobe
        lazy = sorted(storprobe._LAZY_MODULES)
        assert not [m for m in lazy if f"storprobe.{m}" in sys.modules], sys.modules.keys()
        assert [getattr(storprobe, m).__name__ for m in lazy] == [f"storprobe.{m}" for m in lazy]
        try:
            storprobe.no_such_module
        except AttributeError as exc:
            assert "no_such_module" in str(exc)
        else:
            raise AssertionError("an unknown name is an AttributeError")
    """)
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_plugin_example_detects_the_header_its_row_describes(tmp_path):
    (block,) = [b for b in blocks_of("python") if PLUGIN_FILE.match(b.text)]
    package, module = PLUGIN_FILE.match(block.text).groups()
    (tmp_path / package).mkdir()
    (tmp_path / package / f"{module}.py").write_text(block.text)
    (toml,) = blocks_of("toml")
    ((group, entries),) = tomllib.loads(toml.text)["project"]["entry-points"].items()
    assert group == ENTRY_POINT_GROUP
    assert list(entries.values()) == [f"{package}.{module}"]
    check = textwrap.dedent(f"""
        import importlib, storprobe
        plugin = importlib.import_module("{package}.{module}")
        storprobe.register(plugin)
        (row,) = plugin.storprobe_formats()
        header = bytearray(64)
        header[row.magic_offset : row.magic_offset + len(row.magic)] = row.magic
        order = "little" if row.endian == "<" else "big"
        header[row.version_offset : row.version_offset + row.version_width] = row.versions[0].to_bytes(
            row.version_width, order)
        header[row.size_offset : row.size_offset + row.size_width] = (12345).to_bytes(row.size_width, order)
        info = storprobe.probe(bytes(header))
        assert (info.format, info.virtual_size) == (row.name, 12345 * row.size_multiplier), info
    """)
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- Command line ----


def usage_words(usage: str) -> set[str]:
    """The options, metavariables and choices of a usage line, as a set: ``{a,b}`` is
    written ``a|b``, ``X [X ...]`` or ``X...`` is ``X``; ``-h`` goes without saying."""
    usage = re.sub(r"\{([^}]*)\}", lambda m: m.group(1).replace(",", "|"), usage.removeprefix("usage:"))
    words = set()
    for word in re.findall(r"[^\s\[\]]+", usage.replace("[-h]", "")):
        if word.endswith("...") and not word.endswith(",..."):
            word = word[:-3]
        if word:
            words.add(word)
    return words


def synopsis_lines() -> list[str]:
    (block,) = blocks_of("")
    return re.sub(r"\n\s+", " ", block.text).splitlines()


def subparsers() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_synopsis_names_every_command():
    named = {line.split()[1] for line in synopsis_lines() if not line.split()[1].startswith("-")}
    assert named == set(subparsers())


@pytest.mark.parametrize("line", synopsis_lines(), ids=lambda line: line.split()[1])
def test_synopsis_matches_the_usage_line_of_help(line):
    command = line.split()[1]
    args = [] if command.startswith("-") else [command]
    proc = subprocess.run([sys.executable, "-m", "storprobe", *args, "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    usage = proc.stdout.split("\n\n", 1)[0]
    if args:
        assert usage_words(line) == usage_words(usage)
    else:  # a top-level option: it is in the top-level usage
        assert usage_words(line) <= usage_words(usage)


# ---- Other shell blocks ----


@pytest.fixture
def readme_path(tmp_path) -> str:
    """A PATH whose ``python``, ``python3``, ``pip`` and ``storprobe`` are this interpreter's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # scripts, not symlinks: a venv's interpreter reached through a link elsewhere does not find
    # its pyvenv.cfg, and runs as the base interpreter without the venv's packages
    for name, run in (("python", ""), ("python3", ""), ("pip", " -m pip"), ("storprobe", " -m storprobe")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)}{run} "$@"\n')
        script.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_other_shell_blocks_run(readme_path):
    """Each ```sh block but the set-up commands and the skipped ones."""
    ran = 0
    for block in blocks_of("sh"):
        if is_setup_command(block) or block.text.startswith(tuple(SKIPPED)):
            continue
        proc = subprocess.run(["bash", "-euc", block.text.replace(".venv/bin/", "")], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "PATH": readme_path}, timeout=300)
        assert proc.returncode == 0, f"{block.text}\n{proc.stderr}"
        ran += 1
    assert ran
