"""Running under a service manager: systemd's notify protocol and socket activation."""
