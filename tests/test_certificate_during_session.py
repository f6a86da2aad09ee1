"""A card whose certificate stops being valid while its holder is signed in.

- It expires (a hospital with a thousand clinicians and three-year certificates sees that about
  once a day). The card session went on, and presented the expired certificate at every new
  association: the PACS refused each, and the agent said "server rejected our certificate ...
  check that the PACS trusts this issuer", about the PACS. The card is a SoftHSM token made here,
  in a copy of the test PKI, with a certificate that expires seconds after the agent signs in.
- Its CA revokes it (a card reported stolen): the session served on until the card was pulled,
  and a PACS that resumes TLS sessions without checking revocation again accepted it. Here the
  [trust] crl file is replaced by the CA's next CRL, which lists the card.

Now the session ends, and status, the log, the audit trail and the desktop say why and that a new
card is needed.
"""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent_runner import RunningAgent, running_agent, tunnel
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from desktop import Desktop, desktop  # noqa: F401 - a pytest fixture
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp
from test_desktop import clinician_agent, inserted, sign_in
from test_revocation_scope import openssl_crl

VALID_SECONDS = 25  # from the token's making: time for the agent to start, sign in and carry an association

SHORT_LIVED_TOKEN = """
import datetime, os, sys
from pathlib import Path
import pkcs11
from dicom_card_agent.softhsm import pki
from dicom_card_agent.softhsm.provision import KEY_ID, SO_PIN, USER_PIN
from dicom_card_agent.softhsm.tokens import (ca_certificate_id, generate_key_pair, init_token, public_key_of,
                                             store_certificate)
from peers.pki_files import load_ca
conf, pki_dir, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
init_token(conf, "short", so_pin=SO_PIN, user_pin=USER_PIN)
os.environ["SOFTHSM2_CONF"] = str(conf)
ca = load_ca(pki_dir)
with pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so").get_token(token_label="short").open(
        rw=True, user_pin=USER_PIN) as session:
    public, _ = generate_key_pair(session, "ec", KEY_ID, "short")
    now = pki.now()
    certificate = ca.issue_client(pki.name("Short Lived"), public_key_of(public), "short@hospital.example",
                                  not_before=now - pki.DAY, not_after=now + datetime.timedelta(seconds=seconds))
    store_certificate(session, certificate, KEY_ID, "short")
    store_certificate(session, ca.certificate, ca_certificate_id(ca.certificate), ca.subject.rfc4514_string())
print(certificate.not_valid_after_utc.isoformat())
"""


def pki_with_a_short_lived_card(test_pki: ProvisionedPki, directory: Path, seconds: float = VALID_SECONDS,
                                ) -> tuple[ProvisionedPki, datetime.datetime]:
    """A copy of the test PKI and tokens plus a token "short" (CN=Short Lived) whose certificate
    expires ``seconds`` from now; and that expiry."""
    shutil.copytree(test_pki.directory, directory, symlinks=True)
    conf = directory / test_pki.softhsm_conf.name
    conf.write_text(conf.read_text().replace(str(test_pki.directory), str(directory)))
    made = subprocess.run([sys.executable, "-c", SHORT_LIVED_TOKEN, str(conf), str(directory / "pki"),
                           str(seconds)], check=True, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent, env={**test_pki.env(), "PYTHONPATH": str(Path(__file__).parent)})
    return ProvisionedPki(directory, conf), datetime.datetime.fromisoformat(made.stdout.strip())


@contextmanager
def short_lived_card_signed_in(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop,  # noqa: F811
                               seconds: float = VALID_SECONDS,
                               ) -> Iterator[tuple[RunningAgent, ProvisionedPki, datetime.datetime]]:
    """The "short" card (:func:`pki_with_a_short_lived_card`) in the fault module's reader, signed in
    through the PIN dialog on the desktop, with a PACS; the agent, the PKI copy and the expiry."""
    pki, expiry = pki_with_a_short_lived_card(test_pki, tmp_path / "pki", seconds)
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("short")
    with tls_scp(pki_dir=pki.pki) as pacs, clinician_agent(pki, tmp_path, fault_module, card, desktop,
                                                           pacs.port) as agent:
        desktop.wait_for_window("Sign in: Short Lived")
        desktop.type(USER_PIN)
        desktop.key("Return")
        agent.wait_for_log('event=sign-in subject="CN=Short Lived', timeout=20)
        yield agent, pki, expiry


def logged_at(agent: RunningAgent, text: str) -> datetime.datetime:
    line = next(line for line in agent.log().splitlines() if text in line)
    return datetime.datetime.fromisoformat(line.split(" ", 1)[0])


def wait_past(expiry: datetime.datetime) -> None:
    time.sleep(max(0.0, (expiry - datetime.datetime.now(datetime.timezone.utc)).total_seconds()))


def test_a_certificate_that_expires_during_the_session_ends_it_and_says_so(test_pki: ProvisionedPki,
                                                                           tmp_path: Path) -> None:
    pki, expiry = pki_with_a_short_lived_card(test_pki, tmp_path / "pki")
    audit_file = tmp_path / "audit.log"
    expired_on = f"{expiry:%Y-%m-%d %H:%M:%S} UTC"
    with tls_scp(pki_dir=pki.pki) as pacs:
        with running_agent(pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="short",
                           audit={"file": str(audit_file)}) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Short Lived')
            assert echo(agent.port()), agent.log()  # the card serves while its certificate is valid
            wait_past(expiry)
            agent.wait_for_log('event=sign-out reason="certificate expired"', timeout=10)
            ended = logged_at(agent, 'event=sign-out reason="certificate expired"')
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=pki.env())
            refused = not echo(agent.port())
            log = agent.log()
    assert re.search(rf"WARNING: the certificate CN=Short Lived,O=[^:]+ expires on {re.escape(expired_on)} \(in "
                     r"\d+ seconds\): a new card is needed before then\n", log), log  # told at sign-in
    assert re.search(rf"WARNING: the certificate CN=Short Lived,O=[^:]+ expired on {re.escape(expired_on)}: its card "
                     r"session ends; a card with a valid certificate is needed\n", log), log
    assert datetime.timedelta(0) <= ended - expiry < datetime.timedelta(seconds=3), (ended, expiry)
    assert (f"state:    card present, its certificate expired on {expired_on}: a card with a valid certificate "
            "is needed\n") in status.stdout, status.stdout
    assert refused, log  # the application gets A-ASSOCIATE-RJ, no handshake with the expired certificate
    assert "rejected our certificate" not in log, log
    logout = [line for line in audit_file.read_text().splitlines() if "110123" in line]
    assert len(logout) == 1 and "certificate expired" in logout[0], logout


def test_the_clinician_is_told_that_her_card_expired(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path,
                                                     desktop: Desktop) -> None:  # noqa: F811 - the fixture
    with short_lived_card_signed_in(test_pki, tmp_path, fault_module, desktop) as (_, _, expiry):
        wait_past(expiry)
        assert desktop.wait_for_notification("Your card has expired: DICOM connections ended") == (
            "Your card has expired: DICOM connections ended",
            "No PACS accepts it any more. Call the IT service desk (extension 4444) for a new card.")


def revoking_crl(test_pki: ProvisionedPki, work: Path, card: str) -> bytes:
    """The issuing CA's next CRL (a higher CRLNumber than the test PKI's), listing ``card``'s certificate."""
    listed = x509.load_pem_x509_certificate((test_pki.pki / "clients" / f"{card}.pem").read_bytes())
    der = openssl_crl(test_pki.pki, work, [listed], number=50)
    return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)


def test_a_certificate_revoked_during_the_session_ends_it_and_says_so(test_pki: ProvisionedPki,
                                                                      tmp_path: Path) -> None:
    crl_file = tmp_path / "crl" / "issuing-ca.crl.pem"
    crl_file.parent.mkdir()
    crl_file.write_bytes(test_pki.crl.read_bytes())
    audit_file = tmp_path / "audit.log"
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], trust={"crl": [str(crl_file)]},
                           audit={"file": str(audit_file)}) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            assert echo(agent.port()), agent.log()
            replaced = tmp_path / "crl" / "next.pem"
            replaced.write_bytes(revoking_crl(test_pki, tmp_path / "ca", "alice"))
            replaced.rename(crl_file)  # as a CRL fetcher puts the CA's new CRL in place
            agent.wait_for_log('event=sign-out reason="certificate revoked"', timeout=15)
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
            refused = not echo(agent.port())
            log = agent.log()
    revoked = re.search(r"card-agent\[session\]: WARNING: the card's certificate is revoked: (.+); the card session "
                        r"ends\n", log)
    assert revoked and "CN=Alice Example" in revoked[1] and str(crl_file) in revoked[1], log
    assert (f"state:    card present, its certificate was revoked ({revoked[1]}): a new card is needed\n"
            in status.stdout), status.stdout
    assert refused, log
    assert "a new card is needed before then" not in log, log  # alice's certificate is valid for a year
    logout = [line for line in audit_file.read_text().splitlines() if "110123" in line]
    assert len(logout) == 1 and "certificate revoked" in logout[0], logout


def test_the_clinician_is_told_that_her_card_was_revoked(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path,
                                                         desktop: Desktop) -> None:  # noqa: F811 - the fixture
    crl_file = tmp_path / "crl" / "issuing-ca.crl.pem"
    crl_file.parent.mkdir()
    crl_file.write_bytes(test_pki.crl.read_bytes())
    card = inserted(tmp_path)
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port,
                             trust={"crl": [str(crl_file)]}) as agent:
            sign_in(desktop, agent)
            crl_file.write_bytes(revoking_crl(test_pki, tmp_path / "ca", "alice"))
            assert desktop.wait_for_notification("Your card has been revoked: DICOM connections ended") == (
                "Your card has been revoked: DICOM connections ended",
                "No PACS accepts it any more. Call the IT service desk (extension 4444) for a new card.")


def test_a_certificate_that_expires_within_two_weeks_is_told_at_sign_in(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:  # noqa: F811
    """So that a new card comes before the session ends in the middle of work: the log, the desktop
    and `status` say when (3 days and 2 hours here: "3 days")."""
    with short_lived_card_signed_in(test_pki, tmp_path, fault_module, desktop,
                                    seconds=3 * 86400 + 7200) as (agent, pki, expiry):
        notice = desktop.wait_for_notification("Your card expires in 3 days")
        status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml",
                                env={**pki.env(), **desktop.env()})
        log = agent.log()
    assert notice[1] == (f"It cannot be used after {expiry.astimezone():%d %B %Y, %H:%M}. Call the IT service desk "
                         "(extension 4444) for a new card before then.")
    assert re.search(rf"WARNING: the certificate CN=Short Lived,O=[^:]+ expires on {expiry:%Y-%m-%d %H:%M:%S} UTC "
                     r"\(in 3 days\): a new card is needed before then\n", log), log
    expires = f"expires:  {expiry.astimezone():%Y-%m-%dT%H:%M:%S%z} (the certificate's end of validity)\n"
    assert expires in status.stdout, status.stdout
