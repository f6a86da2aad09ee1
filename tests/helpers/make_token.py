"""Make one SoftHSM token, in a directory of its own, with a key pair generated on it and a
certificate from the test PKI's issuing CA: a card the standard test tokens do not cover (a label
and subject carrying terminal escapes, as a hostile or broken card could; an RSA card whose
certificate also allows serverAuth).

Usage: make_token.py OUT_DIR PKI_DIR LABEL KEY_TYPE COMMON_NAME [--server-auth]. KEY_TYPE is rsa
or ec. Run as its own process: it loads SoftHSM with OUT_DIR/softhsm2.conf, which it prints as an
``export SOFTHSM2_CONF=...`` line.
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

out, pki_dir, label, key_type, common_name = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:6]
server_auth = "--server-auth" in sys.argv[6:]
conf = write_softhsm_conf(out)
init_token(conf, label, so_pin=SO_PIN, user_pin=USER_PIN)
os.environ["SOFTHSM2_CONF"] = str(conf)
issuing = pki.CertificateAuthority(
    x509.load_pem_x509_certificate((pki_dir / "issuing-ca.pem").read_bytes()),
    load_pem_private_key((pki_dir / "private" / "issuing-ca.key").read_bytes(), None),
)
now = pki.now()
token = pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so").get_token(token_label=label)
with token.open(rw=True, user_pin=USER_PIN) as session:
    public, _ = generate_key_pair(session, key_type, b"\x01", "card")
    certificate = issuing.issue_client(pki.name(common_name), public_key_of(public), "card@hospital.example",
                                       not_before=now - pki.DAY, not_after=now + 30 * pki.DAY,
                                       server_auth=server_auth)
    store_certificate(session, certificate, b"\x01", "card")
print(f"export SOFTHSM2_CONF={conf}")
