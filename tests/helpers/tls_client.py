"""A TLS client whose key is on the token: stdlib ssl + the pkcs11-provider (OPENSSL_CONF set by
the caller). Usage: tls_client.py PORT CERT_CHAIN KEY_PEM CA_BUNDLE [MAX_VERSION]; PIN in CARD_PIN.
Prints the negotiated version and echoes what the server sends back.
"""

import os
import socket
import ssl
import sys

port, chain, key, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.minimum_version = ssl.TLSVersion.TLSv1_2
if len(sys.argv) > 5:
    context.maximum_version = ssl.TLSVersion[sys.argv[5]]
context.load_verify_locations(ca)
context.load_cert_chain(chain, key, password=os.environ["CARD_PIN"])
with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        print(tls.version(), flush=True)
        tls.sendall(b"signed on the token\n")
        print(tls.recv(100).decode().strip(), flush=True)
