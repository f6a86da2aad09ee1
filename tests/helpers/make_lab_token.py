"""Make a SoftHSM token "lab" whose RSA key is EXTRACTABLE, certified by an existing test PKI.

Usage: make_lab_token.py OUT_DIR PKI_DIR. Run as its own process: it loads SoftHSM with
OUT_DIR/softhsm2.conf. The provisioning code never makes such keys; tests need one to check that
the agent refuses it.
"""

import os
import sys
from pathlib import Path

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from softhsm import pki
from softhsm.provision import KEY_ID, SO_PIN, USER_PIN
from softhsm.tokens import (generate_key_pair, init_token, public_key_of, store_certificate,
                            write_softhsm_conf)

out, pki_dir = Path(sys.argv[1]), Path(sys.argv[2])
conf = write_softhsm_conf(out)
init_token(conf, "lab", so_pin=SO_PIN, user_pin=USER_PIN)
os.environ["SOFTHSM2_CONF"] = str(conf)
issuing = pki.CertificateAuthority(
    x509.load_pem_x509_certificate((pki_dir / "issuing-ca.pem").read_bytes()),
    load_pem_private_key((pki_dir / "private" / "issuing-ca.key").read_bytes(), None),
)
token = pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so").get_token(token_label="lab")
with token.open(rw=True, user_pin=USER_PIN) as session:
    public, _ = generate_key_pair(session, "rsa", KEY_ID, "lab", extractable=True)
    now = pki.now()
    cert = issuing.issue_client(pki.name("Lab Example"), public_key_of(public), "lab@hospital.example",
                                not_before=now - pki.DAY, not_after=now + 30 * pki.DAY)
    store_certificate(session, cert, KEY_ID, "lab")
print(f"export SOFTHSM2_CONF={conf}")
