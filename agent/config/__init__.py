"""The agent's TOML configuration: parsed once, checked completely, with errors that name the key
(agent/config/model.py; tables.py reads TOML tables for it and for agent/audit/config.py)."""
