"""The set-up's install commands keep the user's torch.

Each torchvision release pins one torch release exactly, so an unpinned ``pip install ".[torchvision]"`` takes the
newest torchvision and replaces an installed torch with the newest one. The README and the quick start pin torch
to the installed version in the same command (``"torch==$TORCH"``); here every such command is checked to be
there, and (``ADAPTIVE_HEADS_INSTALL_CHECK=1``, set by ``.ci/run``: a minute of pip resolution per command against
the package index) resolved by pip with ``--dry-run --report``: pip must install nothing named torch, and the
torchvision it picks must pin the installed torch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SET_UP_PAGES = [ROOT / "README.md", ROOT / "docs" / "quickstart.md"]
BASH_BLOCK = re.compile(r"```bash\n(.*?)\n```", re.DOTALL)
PIN = '"torch==$TORCH"'


def _install_commands(page: Path) -> list[str]:
    """The ``pip install`` commands of the page's bash blocks, without comments and what follows ``&&``."""
    commands = []
    for block in BASH_BLOCK.findall(page.read_text()):
        for line in block.splitlines():
            command = line.split("#")[0].split("&&")[0].strip()
            if command.startswith("pip install"):
                commands.append(command)
    return commands


def _extras(command: str) -> set[str]:
    found = re.search(r"\.\[([^\]]*)\]", command)
    return set(found[1].split(",")) if found else set()


COMMANDS = sorted({c for page in SET_UP_PAGES for c in _install_commands(page) if _extras(c) & {"torchvision", "smp"}})


def test_every_install_of_torchvision_or_smp_pins_the_installed_torch():
    for page in SET_UP_PAGES:
        text = page.read_text()
        assert "TORCH=$(python -c" in text, f"{page.name}: the set-up defines $TORCH, the installed torch's version"
        integrations = [c for c in _install_commands(page) if _extras(c) & {"torchvision", "smp"}]
        assert integrations, f"{page.name} gives no command that installs the torchvision and smp extras"
        for command in integrations:
            assert PIN in command, f"{page.name}: {command!r} lets pip replace the installed torch"
    assert any(_extras(c) >= {"test", "torchvision", "smp", "mmseg"} for c in COMMANDS), "no command runs everything"


def _installed_torch() -> str:
    return torch.__version__.split("+")[0]


@pytest.mark.skipif(
    os.environ.get("ADAPTIVE_HEADS_INSTALL_CHECK") != "1",
    reason="resolves the set-up's pip commands against the package index (a minute each): "
    "ADAPTIVE_HEADS_INSTALL_CHECK=1 (CI sets it)",
)
@pytest.mark.parametrize("command", COMMANDS)
def test_pip_resolves_the_command_without_touching_torch(command, tmp_path):
    args = shlex.split(command.replace("$TORCH", _installed_torch()))[2:]  # after "pip install"
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), *args],
        cwd=ROOT,
        check=True,
    )
    install = {
        item["metadata"]["name"].lower().replace("_", "-"): item for item in json.loads(report.read_text())["install"]
    }
    assert "torch" not in install, f"{command!r} would install torch {install['torch']['metadata']['version']}"
    if "torchvision" in install:  # the torchvision pip picked is built for the installed torch
        requires = install["torchvision"]["metadata"].get("requires_dist", [])
        pins = [re.sub(r"[ ()]", "", r) for r in requires]  # "torch (==2.13.0)" or "torch==2.13.0"
        assert f"torch=={_installed_torch()}" in pins, requires


def test_the_quick_start_gives_the_readme_set_up():
    """docs/quickstart.md repeats the README's set-up (PyPI and GitHub show the README, the docs site the quick
    start): the two say the same, link targets aside."""
    readme, quickstart = (page.read_text() for page in SET_UP_PAGES)
    ours = readme[readme.index("Install [PyTorch]") : readme.index("## Quick start")]
    theirs = quickstart[quickstart.index("Install [PyTorch]") : quickstart.index("## Inside an existing model")]
    assert ours.replace("(docs/", "(").strip() == theirs.strip()
