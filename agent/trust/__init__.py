"""Trust decisions about certificates: chains to the configured anchors and revocation by CRL."""
