"""Card sessions: the signed-in identity, and the process that does its TLS."""
