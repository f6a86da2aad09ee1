"""Test tokens on SoftHSM and the test PKI they chain to (``card-agent softhsm init DIR``).

Everything is written inside one directory, with its own ``softhsm2.conf``: the system's SoftHSM
configuration is never touched.
"""
