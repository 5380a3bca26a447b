"""CRSM core: Mamba-2 backbone, recurrent state, and the deliberation machinery (no HTTP)."""
from .config import ConfigError, MambaConfig, SSMConfig
from .state import RecurrentState

__all__ = ["ConfigError", "MambaConfig", "SSMConfig", "RecurrentState"]
