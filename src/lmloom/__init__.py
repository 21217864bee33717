"""lmloom: from raw data to dialogue, with security built into every step."""

__version__ = "0.1.0"
