"""A real smart-card stack for tests: pcscd + vsmartcard's vpcd reader + libcacard (a CAC emulated
over an NSS database) + OpenSC's opensc-pkcs11.so. See docs/testing.md.

- ``bridge``: the process that IS an inserted card (libcacard <-> vpcd's TCP port).
- ``nssdb``: a card's NSS database, key generated in it, certificate from the test PKI.
- ``pcscd``: use the running pcscd or start one; precise reasons when the stack cannot run.
- ``reader``: insert and pull cards, as pcscd reports them.
- ``fixtures``: the pytest fixtures built from these.
"""
