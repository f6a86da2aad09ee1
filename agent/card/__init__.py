"""Card events: which card is in the reader, watched by polling the PKCS#11 module."""
