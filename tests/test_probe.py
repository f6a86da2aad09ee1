"""The card-session process's probe (agent/session/probe.py) against a real token: what it reads
of the card reaches the supervisor whole, however many certificates the card holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from agent_runner import running_agent, tunnel
from conftest import ProvisionedPki
from peers.pynetdicom_scp import echo, tls_scp

CERTIFICATES_STORED = 200
STORE_CA_COPIES = """
import os, sys
from pathlib import Path
import pkcs11
from cryptography import x509
from dicom_card_agent.softhsm.provision import USER_PIN
from dicom_card_agent.softhsm.tokens import store_certificate
conf, ca, copies = Path(sys.argv[1]), x509.load_pem_x509_certificate(Path(sys.argv[2]).read_bytes()), int(sys.argv[3])
os.environ["SOFTHSM2_CONF"] = str(conf)
with pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so").get_token(token_label="alice").open(
        rw=True, user_pin=USER_PIN) as session:
    for n in range(copies):
        store_certificate(session, ca, bytes([0xCA, n]), f"issuing CA copy {n}")
"""


def test_a_card_holding_many_certificates_signs_in(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The probe sends every certificate on the token to the supervisor. A PIV card has 24
    certificate slots, an HSM partition may hold hundreds; alice's token here holds 200 extra CA
    certificates, ~350 KiB in the message: more than one record of the channel can carry (the
    socket's 208 KiB send buffer), and more than the 64 KiB any other message has."""
    copy = tmp_path / "pki"
    shutil.copytree(test_pki.directory, copy, symlinks=True)
    conf = copy / test_pki.softhsm_conf.name
    conf.write_text(conf.read_text().replace(str(test_pki.directory), str(copy)))
    subprocess.run([sys.executable, "-c", STORE_CA_COPIES, str(conf), str(copy / "pki" / "issuing-ca.pem"),
                    str(CERTIFICATES_STORED)], check=True, capture_output=True, timeout=120,
                   cwd=Path(__file__).parent.parent)
    many = ProvisionedPki(copy, conf)
    with tls_scp(pki_dir=many.pki) as pacs:
        with running_agent(many, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            log = agent.wait_for_log('event=sign-in subject="CN=Alice', timeout=30)
            assert echo(agent.port()), log
