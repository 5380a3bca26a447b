"""CRSM core: Mamba-2 backbone, recurrent state, and the deliberation machinery (no HTTP).

Importing the package loads no torch (the command line starts from here); the modules load what they need."""
from .config import ConfigError, MambaConfig, SSMConfig

__all__ = ["ConfigError", "MambaConfig", "SSMConfig"]
