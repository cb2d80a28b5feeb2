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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from obs_support import GRAFANA, REPO, RUNBOOK, github_anchor

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


@pytest.mark.parametrize("doc", [README, GRAFANA / "README.md", RUNBOOK, REPO / "docs" / "distributed.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
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


@pytest.mark.parametrize("doc", [README, RUNBOOK, REPO / "docs" / "distributed.md"], ids=lambda p: str(p.relative_to(REPO)))
def test_links_into_other_docs_name_headings_that_exist(doc: Path) -> None:
    """A link `other.md#anchor` (or `#anchor` in the same file) lands on a heading of that file."""
    broken = []
    for ref, anchor in re.findall(r"\]\(([^)#:\s]*\.md)?#([^)]+)\)", doc.read_text()):
        target = (doc.parent / ref) if ref else doc
        headings = re.findall(r"^#+ (.+)$", target.read_text(), flags=re.MULTILINE)
        if anchor not in {github_anchor(h) for h in headings}:
            broken.append(f"{ref}#{anchor}")
    assert not broken, f"{doc.name} links to headings that do not exist: {broken}"


# README "Dropping files safely": each pattern's one-line example, run by a shell against a real daemon with the
# setting the README names for it; the result must be the whole file, once.
SAFE_DROPS = [
    ({}, "report.txt", "".join(f"{i}\n" for i in range(1, 100001))),
    ({"INGESTD_DONE_MARKER": "true"}, "log.txt", "".join(f"{i}\n" for i in range(1, 1001))),
    ({"INGESTD_QUIET_TIME": "1.5"}, "slow.txt", "LINE 1\nLINE 2\nLINE 3\n"),
]


def safe_drop_examples() -> list[str]:
    text = section(README.read_text(), "Dropping files safely")
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)]


def test_dropping_files_safely_names_its_three_patterns_and_settings() -> None:
    text = section(README.read_text(), "Dropping files safely")
    assert len(safe_drop_examples()) == len(SAFE_DROPS)
    assert "done_marker = true" in text and "quiet_time = 1.5" in text and "same file system" in text


@pytest.mark.parametrize("index", range(len(SAFE_DROPS)))
def test_dropping_files_safely_examples_work_on_a_real_daemon(tmp_path: Path, index: int) -> None:
    from support import DaemonProcess, folder, wait_for

    env, name, content = SAFE_DROPS[index]
    command = safe_drop_examples()[index]
    assert "\n" not in command  # one line, as the README promises
    watch = tmp_path / "w"
    d = DaemonProcess(watch, "--workers", "1", env={"INGESTD_SETTLE_TIME": "0.3", **env}).started()
    try:
        subprocess.run(["sh", "-c", command], env={**os.environ, "W": str(watch)}, check=True, timeout=60)
        wait_for(lambda: d.count("processed") >= 1, 30, what=f"{name} processed")
        time.sleep(2)  # a split file would bring a second version in this time (quiet_time is 1.5 s)
        assert d.count("processed") == 1, [e for e in d.events if e.get("event") == "processed"]
        assert folder(watch, "processed") == [name] and folder(watch, "failed") == []
        assert (watch / "processed" / name).read_text() == content
    finally:
        d.stop()
