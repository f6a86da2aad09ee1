"""Make a SoftHSM token whose label and certificate subject carry terminal escapes, as a hostile
or broken card could: the CLI must print them escaped, never raw (tests/test_newcomer.py).

Usage: make_hostile_token.py OUT_DIR PKI_DIR. Run as its own process: it loads SoftHSM with
OUT_DIR/softhsm2.conf.
"""

import os
import sys
from pathlib import Path

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dicom_card_agent.softhsm import pki
from dicom_card_agent.softhsm.provision import SO_PIN, USER_PIN
from dicom_card_agent.softhsm.tokens import (
    generate_key_pair,
    init_token,
    public_key_of,
    store_certificate,
    write_softhsm_conf,
)

LABEL = "evil\x1b[2J"
COMMON_NAME = "Eve\x1b]0;pwned\x07 Example"

out, pki_dir = Path(sys.argv[1]), Path(sys.argv[2])
conf = write_softhsm_conf(out)
init_token(conf, LABEL, so_pin=SO_PIN, user_pin=USER_PIN)
os.environ["SOFTHSM2_CONF"] = str(conf)
issuing = pki.CertificateAuthority(
    x509.load_pem_x509_certificate((pki_dir / "issuing-ca.pem").read_bytes()),
    load_pem_private_key((pki_dir / "private" / "issuing-ca.key").read_bytes(), None),
)
now = pki.now()
token = pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so").get_token(token_label=LABEL)
with token.open(rw=True, user_pin=USER_PIN) as session:
    public, _ = generate_key_pair(session, "ec", b"\x01", "eve")
    certificate = issuing.issue_client(pki.name(COMMON_NAME), public_key_of(public), "eve@hospital.example",
                                       not_before=now - pki.DAY, not_after=now + 30 * pki.DAY)
    store_certificate(session, certificate, b"\x01", "eve")
print(f"export SOFTHSM2_CONF={conf}")
