"""Shared fixtures: a test PKI with SoftHSM tokens made by the real `card-agent softhsm init`.

PKCS#11 modules are loaded only in child processes (the CLI, helper scripts): python-pkcs11 keeps
one loaded module per process and SoftHSM reads its configuration once, so the pytest process
stays free of both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
CARD_AGENT = str(BIN / "card-agent")
USER_PIN = "123456"
HELPERS = Path(__file__).parent / "helpers"


@dataclass(frozen=True)
class ProvisionedPki:
    directory: Path
    softhsm_conf: Path

    @property
    def pki(self) -> Path:
        return self.directory / "pki"

    @property
    def ca_bundle(self) -> Path:
        return self.pki / "ca-bundle.pem"

    @property
    def crl(self) -> Path:
        return self.pki / "issuing-ca.crl.pem"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("OPENSSL_CONF", "CARD_AGENT_MODULE")}
        env["SOFTHSM2_CONF"] = str(self.softhsm_conf)
        env.update(extra)
        return env


def run_card_agent(*args: str | Path, env: dict[str, str], check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run([CARD_AGENT, *map(str, args)], capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"card-agent {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def provision(directory: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    return run_card_agent("softhsm", "init", directory, *extra, env=env, check=True)


def provisioned(directory: Path, *extra: str) -> ProvisionedPki:
    """A test PKI and its tokens made in ``directory`` (:func:`provision`), as a :class:`ProvisionedPki`."""
    result = provision(directory, *extra)
    export = result.stdout.strip().splitlines()[-1]
    assert export.startswith("export SOFTHSM2_CONF="), result.stdout
    return ProvisionedPki(directory, Path(export.partition("=")[2]))


def make_token(directory: Path, test_pki: ProvisionedPki, label: str, key_type: str, common_name: str, *,
               server_auth: bool = False) -> ProvisionedPki:
    """One more SoftHSM token, alone in ``directory`` (tests/helpers/make_token.py), with the test
    PKI's trust: the card of a test the standard tokens do not cover."""
    result = subprocess.run([sys.executable, str(HELPERS / "make_token.py"), str(directory), str(test_pki.pki), label,
                             key_type, common_name, *(["--server-auth"] if server_auth else [])],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"make_token.py failed ({result.returncode}):\n{result.stderr}")
    return ProvisionedPki(test_pki.directory, directory / "softhsm2.conf")


# What the whole machine has only once, so the tests using it run one after another on one xdist
# worker (scripts/test runs the suite with --dist loadgroup), by the group each fixture puts a test
# in: the machine's pcscd with vpcd's fixed reader port; the Debian package installed into /usr,
# /etc and the systemd directories, which touches no card: its group (a build of minutes) runs
# beside the card tests' instead of after them.
PCSCD_GROUP = "machine"
MACHINE_WIDE_FIXTURES = {"pcscd": PCSCD_GROUP, "card_reader": PCSCD_GROUP, "virtual_cards": PCSCD_GROUP,
                         "machine": "installed-package"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        groups = {group for name, group in MACHINE_WIDE_FIXTURES.items() if name in getattr(item, "fixturenames", ())}
        assert len(groups) <= 1, f"{item.nodeid} uses the fixtures of two machine-wide groups: {groups}"
        for group in groups:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def machine_wide_parts_kept_apart(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Machine-wide tests run in turn; the others do not see the machine's pcscd. A card a virtual
    card test put in vpcd's reader would otherwise be what ``module = auto`` takes, on another
    worker, instead of the SoftHSM tokens a test lists (a machine with no card reader, as theirs is
    meant to be; a test of its own pcscd names its socket, which comes first)."""
    group = request.node.get_closest_marker("xdist_group")
    if group is not None and request.config.getoption("loadgroup", default=False) and "@" not in request.node.nodeid:
        # where xdist did not take the groups in, they would fail against each other like defects
        pytest.fail("pytest-xdist did not put this machine-wide test in its group (--dist loadgroup): install "
                    "the pytest and pytest-xdist versions pyproject.toml names (scripts/setup)")
    if group is None or group.args[:1] != (PCSCD_GROUP,):
        monkeypatch.setenv("PCSCLITE_CSOCK_NAME", str(Path(request.config.rootpath) / "no-pcscd-for-this-test"))


@pytest.fixture(scope="session")
def fault_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fault-injecting PKCS#11 module around SoftHSM (tests/fault_pkcs11), built once."""
    from fault_pkcs11 import build

    return build(tmp_path_factory.mktemp("fault-build"))


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedPki:
    from peers.ports import free_port

    directory = tmp_path_factory.mktemp("card-agent-pki")
    # The certificates name an OCSP responder and CRL on this port; tests start the responder there
    # (test_revocation.py), others find nobody listening: pytest sessions side by side must not meet.
    return provisioned(directory, "--revocation-port", str(free_port()))
