"""The agent's TOML configuration: parsed once, checked completely, with errors that name the key."""

from dicom_card_agent.config.model import AgentConfig, IdentityConfig, ListenAddress, TrustConfig, TunnelConfig, load_config

__all__ = ["AgentConfig", "IdentityConfig", "ListenAddress", "TrustConfig", "TunnelConfig", "load_config"]
