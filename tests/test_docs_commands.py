"""The README's and the getting-started guide's commands run as written, and the demo says what it
did (issue 16: a newcomer following them literally met a garbled demo and commands that failed).

Each document's ``sh`` blocks run in order in one bash, as a reader types them in one terminal,
from the checkout, with a scratch directory as HOME (``~/card-agent-lab``) and as the demo's
directory (DEMO_DIR). Nothing in the commands is rewritten. The one thing changed from outside is
``PYTEST_ADDOPTS=--collect-only``: ``scripts/test`` would otherwise run this whole suite inside
itself; it still runs as written, its pytest only collects. The README's ``scripts/build-deb`` is
run as written by tests/test_debian_package.py, which installs what it built (RUN_BY_ANOTHER_TEST).
About 40 s in all (2 shared cores).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
SHELL_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


def shell_blocks(document: str) -> list[str]:
    return SHELL_BLOCK.findall((REPOSITORY / document).read_text())


def reader_environment(scratch: Path) -> dict[str, str]:
    """The reader's shell: no SoftHSM or agent settings of the test run, HOME and DEMO_DIR in ``scratch``."""
    env = {k: v for k, v in os.environ.items()
           if k != "SOFTHSM2_CONF" and not k.startswith(("CARD_AGENT_", "PYTEST_"))}
    (scratch / "home").mkdir()
    return {**env, "HOME": str(scratch / "home"), "DEMO_DIR": str(scratch / "demo"),
            "PYTEST_ADDOPTS": "--collect-only -q -p no:cacheprovider"}


# README lines another test runs as written, where what they make is used: the package build (40 s,
# minutes on a loaded machine) is installed by the package test, so the suite builds it once.
RUN_BY_ANOTHER_TEST = {"scripts/build-deb": "tests/test_debian_package.py"}


def readme_line(command: str) -> str:
    """The README's line that runs ``command`` (its first word), comment included."""
    lines = [line for block in shell_blocks("README.md") for line in block.splitlines()
             if line.split(maxsplit=1)[:1] == [command]]
    assert len(lines) == 1, lines
    return lines[0]


def _left_to_another_test(document: str, line: str) -> str:
    """``line``, or for a README line another test runs (readme_line), what says so."""
    words = line.split(maxsplit=1)
    if document == "README.md" and words and words[0] in RUN_BY_ANOTHER_TEST:
        return f"echo '=== run by {RUN_BY_ANOTHER_TEST[words[0]]}: {words[0]}'"
    return line


def run_document(document: str, scratch: Path) -> subprocess.CompletedProcess:
    blocks = ["".join(_left_to_another_test(document, line) + "\n" for line in block.splitlines())
              for block in shell_blocks(document)]
    script = "set -eo pipefail\n" + "".join(f"echo '=== block {i + 1} of {document}'\n{block}"
                                              for i, block in enumerate(blocks))
    return subprocess.run(["bash", "-c", script], cwd=REPOSITORY, env=reader_environment(scratch),
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


def run_all_blocks(document: str, blocks: int, scratch: Path) -> str:
    assert len(shell_blocks(document)) == blocks  # a block added to the document is run here too
    result = run_document(document, scratch)
    assert result.returncode == 0, f"{document}:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert f"=== block {blocks} of {document}" in result.stdout
    return result.stdout


def test_every_shell_block_of_the_readme_runs_as_written(tmp_path: Path) -> None:
    out = run_all_blocks("README.md", 1, tmp_path)
    assert_the_demo_stored_the_study_and_showed_the_audit_trail(out, tmp_path)  # scripts/demo
    assert re.search(r"^\d+ tests collected", out, re.MULTILINE), out[-2000:]  # scripts/test
    assert "=== run by tests/test_debian_package.py: scripts/build-deb" in out


def test_every_shell_block_of_the_getting_started_guide_runs_as_written(tmp_path: Path) -> None:
    out = run_all_blocks("docs/getting-started.md", 6, tmp_path)
    lab = tmp_path / "home" / "card-agent-lab"
    assert f"{lab}/pki/clients/alice.pem: OK" in out  # openssl verify
    assert re.search(r"^\d+\s+alice\s+\S+\s+SoftHSM project\s+SoftHSM v2\s+ok", out, re.MULTILINE), \
        out  # card-agent tokens --module softhsm2
    assert "mallory: CN=Mallory Example" in out and "UNUSABLE: " in out
    assert "ok   chain alice: complete to" in out  # doctor


def assert_the_demo_stored_the_study_and_showed_the_audit_trail(out: str, scratch: Path) -> None:
    """What scripts/demo (the README's first command) printed: the 4 files the PACS stored, then the
    audit trail, one line per record, from the agent's start to its stop."""
    received = scratch / "demo" / "tunnel" / "received"
    stored = sorted(os.listdir(received))
    assert len(stored) == 4
    lines = out[out.index("The PACS stored"):].splitlines()
    assert lines[0] == f"The PACS stored 4 of 4 files in {received}:"
    assert lines[1:5] == stored
    assert lines[5:7] == ["", f"== The audit trail ({scratch}/demo/tunnel/audit.log)"]
    trail = list(itertools.takewhile(lambda line: re.match(r"\d{4}-\d\d-\d\dT", line), lines[7:]))
    events = [re.split(r"\s{2,}", line)[1] for line in trail]
    assert events == ["Application Start", "Login", "Association Begin", *["DICOM Instances Transferred"] * 4,
                      "Association End", "Logout", "Application Stop"], trail
    assert out.count("== The audit trail") == 1
