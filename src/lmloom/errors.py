"""Errors a user can act on. The CLI prints these as one line, never as a traceback."""


class LmloomError(Exception):
    """Base for every error caused by input, configuration or stored state rather than a bug."""

    exit_code = 1


class ConfigError(LmloomError):
    """A recipe or option names an unknown key or carries a value that is not allowed."""

    exit_code = 2


class IntegrityError(LmloomError):
    """Stored state (an artifact file, a manifest, the audit log) does not match its recorded hash."""

    exit_code = 3


class DataError(LmloomError):
    """The input data cannot produce a usable result (e.g. nothing is left after cleaning)."""


class SecurityError(LmloomError):
    """A security control refused the action: a missing or wrong key, a bad or untrusted signature."""

    exit_code = 4


class AccessDenied(SecurityError):
    """The access policy does not grant the acting principal the permission an action needs."""

    exit_code = 5
