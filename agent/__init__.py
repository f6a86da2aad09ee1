"""dicom-card-agent: a smart card (PKCS#11) as the mutual-TLS identity of DICOM applications."""

__version__ = "0.1.0"
