"""The package version, in one place (read by the manifest, the User-Agent and --version)."""

__version__ = "0.1.0"
