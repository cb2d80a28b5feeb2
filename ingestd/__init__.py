"""ingestd: a systemd-native file-ingestion daemon."""

__version__ = "0.1.0"
