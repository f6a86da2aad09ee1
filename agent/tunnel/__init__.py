"""Local listeners and the relay to the remote PACS."""
