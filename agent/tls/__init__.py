"""TLS through OpenSSL (stdlib ``ssl``) with the token's key reached via the pkcs11-provider."""
