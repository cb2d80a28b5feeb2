"""What the operator docs claim, checked: README's "Run as a service" names the Python `make install`
accepts, and install.mk really refuses an interpreter under /root or /home with the command the README
gives; grafana/README.md makes no claim that Debian ships Grafana and says where it comes from; the
files the operator docs link to exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from obs_support import GRAFANA, REPO, RUNBOOK

README = REPO / "README.md"


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a Markdown text."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no section {heading!r}"
    return match.group(1)


def install_check(python: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("make install-check refuses anyone but root")
    return subprocess.run(["make", "-s", "-C", str(REPO), "-f", "packaging/install.mk", "install-check",
                           f"PYTHON={python}"], capture_output=True, text=True)


@pytest.fixture
def python_under_root() -> Iterator[str]:
    """A real Python 3.11+ whose prefix is under /root, as pyenv or conda install one: the interpreter
    running the tests when it is one, else a relocated copy of the system interpreter."""
    if Path(sys.base_prefix).is_relative_to("/root") or Path(sys.base_prefix).is_relative_to("/home"):
        yield str(Path(sys.base_prefix) / "bin" / "python3")
        return
    system = Path("/usr/bin/python3").resolve()
    if not (Path("/root").is_dir() and os.access("/root", os.W_OK)):
        pytest.skip("/root is not writable here")
    prefix = Path(tempfile.mkdtemp(dir="/root", prefix="ingestd-test-python-"))
    try:
        (prefix / "bin").mkdir()
        (prefix / "lib").mkdir()
        shutil.copy2(system, prefix / "bin" / "python3")
        (prefix / "lib" / system.name).symlink_to(Path("/usr/lib") / system.name)  # stdlib: its prefix is here
        yield str(prefix / "bin" / "python3")
    finally:
        shutil.rmtree(prefix)


def test_run_as_a_service_names_the_system_python_install_needs() -> None:
    text = section(README.read_text(), "Run as a service")
    assert "sudo make install PYTHON=/usr/bin/python3" in text
    assert "python3-venv" in text and "/root" in text and "/home" in text and "3.11" in text


def test_install_accepts_the_system_python() -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 here")
    r = install_check("/usr/bin/python3")
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_refuses_a_python_under_root_with_the_readmes_command(python_under_root: str) -> None:
    probe = subprocess.run([python_under_root, "-c", "import sys; print(sys.base_prefix)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(("/root/", "/home/")), probe.stdout  # a real interpreter living there
    r = install_check(python_under_root)
    assert r.returncode != 0
    assert "ProtectHome=yes" in r.stderr and "make install PYTHON=/usr/bin/python3" in r.stderr, r.stderr
    assert "make install PYTHON=/usr/bin/python3" in section(README.read_text(), "Run as a service")


def test_grafana_readme_does_not_say_debian_ships_grafana() -> None:
    text = (GRAFANA / "README.md").read_text()
    for heading in re.findall(r"^#+ .*$", text, flags=re.MULTILINE):
        assert not re.search(r"Debian('s)?\s+(or any packaged\s+)?Grafana", heading), heading
    assert "Grafana is not packaged by Debian" in text
    assert "https://grafana.com/docs/grafana/latest/setup-grafana/installation/debian/" in text
    # The Prometheus side is a script and its steps, no longer a manual merge.
    assert "debian-setup.sh" in text and "merge the ingestd job" not in text


@pytest.mark.parametrize("doc", [README, GRAFANA / "README.md", RUNBOOK], ids=lambda p: str(p.relative_to(REPO)))
def test_files_the_operator_docs_point_at_exist(doc: Path) -> None:
    text = doc.read_text()
    links = re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text)             # [text](relative/path)
    paths = re.findall(r"`((?:\.\./)*(?:packaging|grafana|docs)/[\w./-]+)`", text)  # `packaging/...`
    missing = []
    for ref in links + paths:
        for base in (doc.parent, REPO):  # shell commands run from the repository's top
            if (base / ref).exists():
                break
        else:
            missing.append(ref)
    assert links + paths and not missing, f"{doc.name} points at missing files: {missing}"
