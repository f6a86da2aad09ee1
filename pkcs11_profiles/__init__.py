"""One TOML file per PKCS#11 module family; loaded by :mod:`agent.token.profiles`."""
