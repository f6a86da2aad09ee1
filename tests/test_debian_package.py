"""The Debian package, as an admin uses it: scripts/build-deb builds it, `apt install ./file.deb`
installs it with its dependencies, the installed agent finds its configuration in
/etc/dicom-card-agent/agent.toml without --config and stores a study with a SoftHSM identity at a
TLS storescp; a newer revision of it (the same package re-versioned: a second build took minutes
of the suite's time) upgrades it; purging leaves only the admin's configuration.

It installs on this machine, so it runs as root on Debian and refuses to touch a machine where the
package or /etc/dicom-card-agent already exists. The admin's /etc/dicom-card-agent is seen only by
the package's commands (apt, the installed agent), each in a mount namespace of its own: the rest of
the suite runs beside this test on the same machine, and an agent there started without a
configuration found this one (a doctor test checked bob against this test's CA bundle).

The build takes ~40 s to a few minutes (dh-virtualenv installs the Python dependencies from PyPI)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

from agent_runner import stop_agent
from conftest import USER_PIN, ProvisionedPki
from peers.dcmtk import storescp, storescu
from peers.pki_files import TlsServerFiles
from peers.ports import free_port
from peers.study import assert_delivered, make_study
from test_docs_commands import readme_line

REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGE = "dicom-card-agent"
ETC = Path("/etc/dicom-card-agent")
INSTALLED = Path("/usr/bin/card-agent")
GLOBAL_LINK = Path("/etc/systemd/user/default.target.wants/card-agent.service")
VERSION = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["version"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the package test cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This machine, ready for the package and left as it was found; yields the directory the
    package's commands see as /etc/dicom-card-agent (:func:`with_admin_etc`)."""
    if os.geteuid() != 0:
        _unavailable("installing a package needs root")
    for tool in ("dpkg-buildpackage", "dh_virtualenv", "apt-get"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is missing (scripts/setup installs it)")
    if _installed_version() is not None or ETC.exists():
        _unavailable(f"{PACKAGE} is installed or {ETC} exists: this test installs and purges the package "
                     "and writes that configuration, so it runs only on a machine without them")
    admin_etc = tmp_path_factory.mktemp("etc-dicom-card-agent")
    admin_etc.chmod(0o755)
    ETC.mkdir(mode=0o755)  # the mount point; empty here, where the rest of the suite looks
    try:
        yield admin_etc
    finally:
        if _installed_version() is not None:
            _apt("purge", PACKAGE)
        shutil.rmtree(ETC, ignore_errors=True)


def with_admin_etc(admin_etc: Path, command: list[str]) -> list[str]:
    """``command`` run where /etc/dicom-card-agent is ``admin_etc``: a private mount namespace, its
    own bind mount; the command's process keeps the PID (unshare and sh exec it)."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount --bind "$0" /etc/dicom-card-agent && exec "$@"', str(admin_etc), *command]


def _installed_version() -> str | None:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", PACKAGE], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.startswith("install ok installed"):
        return None
    return result.stdout.split()[-1]


def _apt(*args: str, admin_etc: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "-y", "-q", "--no-install-recommends", *args]
    result = subprocess.run(command if admin_etc is None else with_admin_etc(admin_etc, command),
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def build_as_the_readme_says() -> Path:
    """The README's build command, run as written from the checkout (tests/test_docs_commands.py
    leaves it to this test: one build per suite), and the package it says it makes."""
    line = readme_line("scripts/build-deb")
    command, _, comment = line.partition("#")
    result = subprocess.run(shlex.split(command), cwd=REPOSITORY, capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    deb = Path(result.stdout.strip().splitlines()[-1])
    promised = f"dist/{PACKAGE}_{VERSION}-1_{_architecture()}.deb"
    assert promised in comment
    assert deb == REPOSITORY / promised
    return deb


def as_revision(deb: Path, revision: int, out: Path) -> Path:
    """``deb`` again as a newer revision, for the upgrade: the same files and maintainer scripts,
    its control file's Version raised. A second scripts/build-deb run (a dh-virtualenv pip install
    of minutes, the longest step of the whole suite) would give the same package. Its archive is
    not compressed: dpkg-deb's default (xz -6, threaded) took 72 s of CPU in a loaded suite run,
    and what is measured here is the upgrade, not the compression (dpkg reads either)."""
    out.mkdir(exist_ok=True)
    tree = out / f"revision-{revision}"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, capture_output=True, timeout=300)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    assert f"Version: {VERSION}-1\n" in text, text
    control.write_text(text.replace(f"Version: {VERSION}-1\n", f"Version: {VERSION}-{revision}\n"))
    newer = out / f"{PACKAGE}_{VERSION}-{revision}_{_architecture()}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Znone", "-b", str(tree), str(newer)], check=True,
                   capture_output=True, timeout=300)
    return newer


def assert_nothing_of_where_it_was_built(tree: Path) -> None:
    """The package's files (``tree``: dpkg-deb -R of it) hold nothing of the build: two builds of
    one checkout made packages that differed in pyvenv.cfg's `command` line and direct_url.json (the
    scratch directory's random name), in the RECORDs of distributions with scripts (their hashes
    taken before dh_virtualenv rewrote the scripts' first line; the agent's build digest is its
    RECORD's) and in the Debian changelog's date (the build's), which dpkg makes every file's time.
    Now they are the same byte for byte (docs/deployment.md)."""
    scratch = re.compile(rb"build-deb\.[A-Za-z0-9]{6}")
    leaking = [str(path.relative_to(tree)) for path in tree.rglob("*")
               if path.is_file() and not path.is_symlink() and scratch.search(path.read_bytes())]
    assert not leaking, f"the build's scratch directory is named in {leaking}"
    site = next((tree / "usr/lib/dicom-card-agent/lib").glob("python3*/site-packages"))
    stale = []
    for record in sorted(site.glob("*.dist-info/RECORD")):
        for name, digest, size in (line.rsplit(",", 2) for line in record.read_text().splitlines()):
            if digest:
                data = (site / name).read_bytes()
                actual = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                if (actual, str(len(data))) != (digest, size):
                    stale.append(name)
    assert not stale, f"RECORD hashes that are not the shipped files': {stale}"
    changelog = subprocess.run(["zcat", str(tree / "usr/share/doc/dicom-card-agent/changelog.Debian.gz")],
                               capture_output=True, text=True, check=True).stdout
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    released = subprocess.run(["date", "-R", "-u", "-d", f"@{epoch}"] if epoch else
                              ["git", "-C", str(REPOSITORY), "log", "-1", "--format=%aD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert changelog.rstrip("\n").endswith(f"  {released}"), changelog


def _architecture() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def package_files() -> set[Path]:
    listed = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True, check=True).stdout
    return {Path(line) for line in listed.splitlines() if line.startswith("/")}


def installed_agent(*args: str, admin_etc: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(with_admin_etc(admin_etc, [str(INSTALLED), *args]), capture_output=True, text=True,
                          env=env, timeout=120, stdin=subprocess.DEVNULL)


def clean_env(test_pki: ProvisionedPki, home: Path, **extra: str) -> dict[str, str]:
    """No virtualenv, no configuration but /etc's: a workstation user's environment."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "SOFTHSM2_CONF": str(test_pki.softhsm_conf), **extra}
    return env


def write_system_config(admin_etc: Path, test_pki: ProvisionedPki, runtime: Path, pacs_port: int) -> int:
    """/etc/dicom-card-agent as config management writes it: the CA bundle, the CRL, agent.toml."""
    port = free_port()
    for source in (test_pki.ca_bundle, test_pki.crl):
        shutil.copy(source, admin_etc / source.name)
        (admin_etc / source.name).chmod(0o644)
    (admin_etc / "agent.toml").write_text(
        "[identity]\n"
        'token = "alice"\nmodule = "softhsm2"\npin = "env:CARD_PIN"\n\n'
        "[trust]\n"
        f'ca = "ca-bundle.pem"\ncrl = ["{test_pki.crl.name}"]\n\n'
        "[[tunnel]]\n"
        f'name = "pacs"\nlisten = "127.0.0.1:{port}"\nremote = "127.0.0.1:{pacs_port}"\nserver_name = "localhost"\n\n'
        "[agent]\n"
        f'runtime_dir = "{runtime}"\n')
    (admin_etc / "agent.toml").chmod(0o644)
    return port


def test_build_install_store_a_study_upgrade_and_purge(machine: Path, test_pki: ProvisionedPki,
                                                       tmp_path: Path) -> None:
    admin_etc = machine
    started = time.monotonic()
    first = build_as_the_readme_says()
    built_in = time.monotonic() - started
    second = as_revision(first, 2, tmp_path / "dist")
    assert_nothing_of_where_it_was_built(tmp_path / "dist" / "revision-2")

    _apt("install", str(first), admin_etc=admin_etc)
    assert _installed_version() == f"{VERSION}-1"
    files = package_files()
    for expected in (INSTALLED, Path("/usr/lib/systemd/user/card-agent.service"),
                     Path("/usr/lib/dicom-card-agent/bin/python3"),
                     Path("/usr/share/doc/dicom-card-agent/deployment.md"),
                     Path("/usr/share/doc/dicom-card-agent/configuration.md"),
                     Path("/usr/share/doc/dicom-card-agent/examples/agent.toml"),
                     Path("/usr/share/doc/dicom-card-agent/examples/card-agent.socket")):
        assert expected in files, expected
    desktop = sorted((REPOSITORY / "desktop").glob("*.desktop")) if (REPOSITORY / "desktop").is_dir() else []
    for entry in desktop:
        assert Path("/usr/share/applications") / entry.name in files
    # The service is shipped, not enabled: the agent needs a configuration first.
    assert not GLOBAL_LINK.exists()
    # Nothing of the test rig came with it.
    depends = subprocess.run(["dpkg-query", "-W", "-f=${Depends}", PACKAGE], capture_output=True, text=True,
                             check=True).stdout
    names = {alternative.split()[0] for clause in depends.split(",") for alternative in clause.split("|")}
    assert {"pcscd", "opensc-pkcs11", "pkcs11-provider", "pinentry-gnome3", "python3"} <= names
    assert names.isdisjoint({"dcmtk", "orthanc", "stunnel4", "gcc", "vsmartcard-vpcd", "softhsm2", "pinentry-curses"})
    # The clinician guide's pictures, where its links look for them; the upstream changelog under
    # the name docs/deployment.md gives, and the Debian changelog pointing at it.
    for image in sorted((REPOSITORY / "docs" / "images").glob("*.png")):
        assert Path("/usr/share/doc/dicom-card-agent/images") / image.name in files, image
    assert Path("/usr/share/doc/dicom-card-agent/changelog.gz") in files
    debian_changelog = subprocess.run(["zcat", "/usr/share/doc/dicom-card-agent/changelog.Debian.gz"],
                                      capture_output=True, text=True, check=True).stdout
    assert f"  * Release {VERSION} (see /usr/share/doc/dicom-card-agent/changelog.gz, the upstream CHANGELOG.md)." \
        in debian_changelog

    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(test_pki, home)
    version = installed_agent("--version", admin_etc=admin_etc, env=env)
    assert (version.returncode, version.stdout) == (0, f"card-agent {VERSION}\n")
    verify = subprocess.run(["systemd-analyze", "verify", "--user", "/usr/lib/systemd/user/card-agent.service"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(_private_dir(tmp_path / "xdg"))})
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    # docs/deployment.md's commands, as written (SoftHSM's tokens stand for the card in the reader).
    assert subprocess.run(["systemctl", "is-enabled", "pcscd.socket"], capture_output=True, text=True).stdout \
        == "enabled\n"
    enabled = subprocess.run(["systemctl", "--global", "enable", "card-agent.service"], capture_output=True, text=True)
    assert enabled.returncode == 0, enabled.stderr
    assert GLOBAL_LINK.resolve() == Path("/usr/lib/systemd/user/card-agent.service")

    study = make_study(tmp_path / "study", files=3)
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as pacs:
        port = write_system_config(admin_etc, test_pki, _private_dir(tmp_path / "run"), pacs.port)
        doctor = installed_agent("doctor", "--token", "alice", "--ca", "/etc/dicom-card-agent/ca-bundle.pem",
                                 admin_etc=admin_etc, env={**env, "CARD_AGENT_MODULE": "softhsm2"})
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "ok   chain alice: " in doctor.stdout
        # What config management runs before rolling the configuration out: no --config, /etc's file.
        check = installed_agent("check", admin_etc=admin_etc, env={**env, "CARD_PIN": USER_PIN})
        assert check.returncode == 0, check.stdout + check.stderr
        assert "ok   config: /etc/dicom-card-agent/agent.toml: 1 tunnel(s)" in check.stdout, check.stdout
        log_path = tmp_path / "agent.log"
        with open(log_path, "w") as log:
            agent = subprocess.Popen(with_admin_etc(admin_etc, [str(INSTALLED), "run"]), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**env, "CARD_PIN": USER_PIN}, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while "card-agent: INFO: ready:" not in log_path.read_text():
                assert agent.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            status = installed_agent("status", admin_etc=admin_etc, env=env)  # no --config either: /etc's agent
            # The suite's other agents, outside this test's namespaces, find no configuration there.
            assert sorted(ETC.iterdir()) == []
            assert status.returncode == 0 and "signed in" in status.stdout, status.stdout + status.stderr
            sent = storescu(port, study)
            assert sent.returncode == 0, sent.stdout
        finally:
            assert stop_agent(agent) == 0, log_path.read_text()
        received = pacs.stored_files()
        subjects = pacs.peer_subjects()
    assert_delivered(study, received)
    assert subjects and all(s.endswith("/CN=Alice Example") for s in subjects)
    # Running it wrote nothing into the package's own directory (no byte code of its own).
    ours = {p for p in Path("/usr/lib/dicom-card-agent").rglob("*")}
    assert ours - files == set()

    configuration = (admin_etc / "agent.toml").read_bytes()
    _apt("install", str(second), admin_etc=admin_etc)
    assert _installed_version() == f"{VERSION}-2"
    assert installed_agent("--version", admin_etc=admin_etc, env=env).stdout == f"card-agent {VERSION}\n"
    assert (admin_etc / "agent.toml").read_bytes() == configuration  # the admin's file is the admin's

    files = package_files()
    _apt("purge", PACKAGE, admin_etc=admin_etc)
    assert _installed_version() is None
    left = sorted(str(p) for p in files if p.exists() and not p.is_dir())
    assert left == []
    assert not Path("/usr/lib/dicom-card-agent").exists()
    assert not Path("/usr/share/doc/dicom-card-agent").exists()
    assert not GLOBAL_LINK.exists() and not GLOBAL_LINK.is_symlink()  # purge takes the --global enable back
    assert (admin_etc / "agent.toml").read_bytes() == configuration  # only the admin's configuration stays
    assert sorted(p.name for p in admin_etc.iterdir()) == sorted(["agent.toml", "ca-bundle.pem", test_pki.crl.name])
    print(f"the build took {built_in:.0f} s, the whole test {time.monotonic() - started:.0f} s")


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    return path


# -- what the package says, without building it --------------------------------------------------------

# The Debian package of each pinentry program the agent runs (agent/desktop/config.py, pinentry_choice.py).
PINENTRY_PACKAGES = {"pinentry-gnome3": "pinentry-gnome3", "pinentry-qt": "pinentry-qt",
                     "pinentry-gtk-2": "pinentry-gtk2", "pinentry-tty": "pinentry-tty"}


def control_fields() -> dict[str, str]:
    """debian/control's binary package paragraph, comment lines dropped and continuation lines joined."""
    paragraphs = (REPOSITORY / "debian" / "control").read_text().split("\n\n")
    package = next(p for p in paragraphs if p.startswith("Package:"))
    fields: dict[str, str] = {}
    name = ""
    for line in package.splitlines():
        if line.startswith("#"):
            continue
        if line[:1].isspace():
            fields[name] += " " + line.strip()
        else:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def relations(field: str) -> list[list[str]]:
    """A relation field as its clauses, each the names of its alternatives."""
    return [[alternative.split()[0] for alternative in clause.split("|")] for clause in field.split(",")
            if clause.strip()]


def test_the_package_depends_on_a_pin_dialog_the_agent_runs() -> None:
    """A workstation with only pinentry-curses (GnuPG's) used to satisfy the dependency, and
    `pin = "pinentry"` then had no dialog to show: the agent never runs pinentry-curses."""
    from dicom_card_agent.desktop.config import GRAPHICAL_PINENTRIES
    from dicom_card_agent.desktop.pinentry_choice import TERMINAL_PINENTRY

    fields = control_fields()
    pinentry_clauses = [clause for clause in relations(fields["Depends"]) if clause[0].startswith("pinentry")]
    assert pinentry_clauses == [[PINENTRY_PACKAGES[program] for program in GRAPHICAL_PINENTRIES]]
    assert relations(fields["Recommends"]) == [[PINENTRY_PACKAGES[TERMINAL_PINENTRY]]]
    assert "pinentry-curses" not in fields["Depends"] + fields["Recommends"]


@pytest.mark.parametrize("program", sorted(PINENTRY_PACKAGES))
def test_each_pinentry_package_named_holds_its_program(program: str) -> None:
    """The names above, checked against dpkg where the package is installed on this machine (the
    desktop tests' pinentry-gtk-2 and pinentry-tty), else against the archive: a package by that name
    exists (apt-cache reads the lists scripts/setup's apt-get update fetched)."""
    package = PINENTRY_PACKAGES[program]
    owner = subprocess.run(["dpkg", "-S", f"/usr/bin/{program}"], capture_output=True, text=True)
    if owner.returncode == 0:
        assert owner.stdout == f"{package}: /usr/bin/{program}\n"
        return
    archive = subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True, text=True)
    assert archive.returncode == 0 and f"Package: {package}\n" in archive.stdout, archive.stderr


def test_the_package_ships_the_clinician_guide_s_pictures() -> None:
    """docs/images/*.png are linked from clinician-guide.md as images/NAME: dh_installdocs copies the
    listed directory to /usr/share/doc/dicom-card-agent/images."""
    docs = (REPOSITORY / "debian" / "dicom-card-agent.docs").read_text().split()
    assert "docs/images" in docs and "docs/*.md" in docs
    guide = (REPOSITORY / "docs" / "clinician-guide.md").read_text()
    linked = set(re.findall(r"\]\(images/([^)]+)\)", guide))
    assert linked and linked <= {image.name for image in (REPOSITORY / "docs" / "images").iterdir()}


def test_the_debian_changelog_names_the_upstream_changelog_as_installed() -> None:
    """dh_installchangelogs installs CHANGELOG.md as changelog.gz; the Debian changelog scripts/build-deb
    writes, and docs/deployment.md, must name that file."""
    build_deb = (REPOSITORY / "scripts" / "build-deb").read_text()
    assert "(see /usr/share/doc/dicom-card-agent/changelog.gz, the upstream CHANGELOG.md)" in build_deb
    assert "CHANGELOG.md.gz" not in build_deb
    deployment = (REPOSITORY / "docs" / "deployment.md").read_text()
    assert "Read `/usr/share/doc/dicom-card-agent/changelog.gz` (`CHANGELOG.md`" in deployment
    assert "Read `CHANGELOG.md`" not in deployment


USAGE = "usage: scripts/build-deb [--revision N] [--out DIR]"


@pytest.mark.parametrize(("arguments", "message"), [
    (["--revision", "1 2"], "build-deb: --revision 1 2: use digits (e.g. 2)"),
    (["--out"], f"build-deb: --out needs a directory; {USAGE}"),
    (["--revision"], f"build-deb: --revision needs a number (e.g. 2); {USAGE}"),
    (["--bogus"], f"build-deb: unknown argument --bogus; {USAGE}"),
])
def test_build_deb_refuses_bad_arguments_before_building(arguments: list[str], message: str) -> None:
    """The README's build (run by the package test) takes no arguments: what an admin may add,
    checked here without a build."""
    result = subprocess.run([str(REPOSITORY / "scripts" / "build-deb"), *arguments], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stderr.strip(), result.stdout) == (2, message, "")
