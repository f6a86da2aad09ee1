"""DICOM on the plain side of the agent: the Upper Layer protocol (PS3.8) the relay watches."""
