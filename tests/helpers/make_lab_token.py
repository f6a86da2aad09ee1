"""Make a SoftHSM token "lab" holding the identities the provisioning never makes, certified by an
existing test PKI, so that tests can check every reason an identity is refused:

  CKA_ID 01  EXTRACTABLE RSA key + valid certificate          -> "extractable key"
  CKA_ID 02  certificate only, no key                         -> "no matching private key"
  CKA_ID 03  key + certificate for serverAuth/keyEncipherment -> "wrong key usage"
  CKA_ID 04  key + certificate valid only from next week      -> "not yet valid"

Usage: make_lab_token.py OUT_DIR PKI_DIR. Run as its own process: it loads SoftHSM with
OUT_DIR/softhsm2.conf.
"""

import os
import sys
from pathlib import Path

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from dicom_card_agent.softhsm import pki
from dicom_card_agent.softhsm.provision import SO_PIN, USER_PIN
from dicom_card_agent.softhsm.tokens import (
    generate_key_pair,
    init_token,
    public_key_of,
    store_certificate,
    write_softhsm_conf,
)

out, pki_dir = Path(sys.argv[1]), Path(sys.argv[2])
conf = write_softhsm_conf(out)
init_token(conf, "lab", so_pin=SO_PIN, user_pin=USER_PIN)
os.environ["SOFTHSM2_CONF"] = str(conf)
issuing = pki.CertificateAuthority(
    x509.load_pem_x509_certificate((pki_dir / "issuing-ca.pem").read_bytes()),
    load_pem_private_key((pki_dir / "private" / "issuing-ca.key").read_bytes(), None),
)
now = pki.now()
token = pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so").get_token(token_label="lab")


def client(public, name, not_before=now - pki.DAY):
    return issuing.issue_client(pki.name(name), public_key_of(public), "lab@hospital.example",
                                not_before=not_before, not_after=now + 30 * pki.DAY)


with token.open(rw=True, user_pin=USER_PIN) as session:
    public, _ = generate_key_pair(session, "rsa", b"\x01", "exportable", extractable=True)
    store_certificate(session, client(public, "Lab Exportable"), b"\x01", "exportable")

    public, private = generate_key_pair(session, "ec", b"\x02", "keyless")
    store_certificate(session, client(public, "Lab Keyless"), b"\x02", "keyless")
    private.destroy()
    public.destroy()

    public, _ = generate_key_pair(session, "ec", b"\x03", "server-only")
    server_only = issuing.issue(pki.name("Lab Server Only"), public_key_of(public), not_before=now - pki.DAY,
                                not_after=now + 30 * pki.DAY, extensions=[
                                    (x509.BasicConstraints(ca=False, path_length=None), True),
                                    (pki.key_usage(key_encipherment=True), True),
                                    (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    store_certificate(session, server_only, b"\x03", "server-only")

    public, _ = generate_key_pair(session, "ec", b"\x04", "future")
    store_certificate(session, client(public, "Lab Future", not_before=now + 7 * pki.DAY), b"\x04", "future")
print(f"export SOFTHSM2_CONF={conf}")
