"""Revocation of TLS peers' and the card's own certificates: OCSP, CRL distribution points, CRL files."""
