"""Real DICOM peers on loopback for integration tests and benchmarks.

Modules (import them directly, e.g. ``from peers.dcmtk import storescp``):

- ``ports``: ``free_port()`` (each port once per process, below the ephemeral range),
  ``wait_for_port()``, ``managed_process()`` (process group, log file, ``TCP_NODELAY=1``, killed on
  exit) and ``run_peer_tool()`` for short-lived clients.
- ``pki_files``: ``TlsServerFiles``/``TlsClientFiles`` and FILE-key identities issued from the test
  PKI (``issue_client_file_identity``, ``issue_server_file_identity``, ``write_crl``).
- ``dcmtk``: ``storescp`` (context manager), ``storescu``, ``echoscu``, and ``tls11_only_server``
  (openssl s_server speaking TLS 1.1 only).
- ``orthanc``: ``orthanc_tls``/``orthanc``, a private Orthanc 1.10 with DICOM TLS and REST.
- ``pynetdicom_scp``: ``tls_scp``/``plain_scp``, an in-process SCP recording the client
  certificate, AE titles, User Identity and stored datasets per association; ``associate`` (SCU).
- ``dns``: ``DnsServer`` (answers, slowly or never, on a loopback address of its own) and
  ``resolving_through`` (a command prefix pointing a process's resolver at it; root only).
- ``study``: ``make_study`` (sample study from pydicom's bundled files, fast bulk cloning),
  ``datasets_equal``, ``match_by_sop_instance_uid``.

Every server is a context manager that waits until it listens and stops everything it started
when the block ends. Nothing here uses the system Orthanc service or the network beyond loopback.
"""
