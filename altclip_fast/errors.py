"""Exceptions a user of altclip-fast can act on. The CLI turns these into one line and a non-zero exit
(``exit_code``, 1 unless the class says otherwise)."""


class AltCLIPError(Exception):
    """Base class of every error altclip-fast raises on purpose."""


class ConfigError(AltCLIPError, ValueError):
    """A configuration is malformed: wrong model_type, a missing or invalid field, inconsistent sizes."""


class CheckpointError(AltCLIPError):
    """Weights cannot be found, read, or matched to the model (missing/unexpected keys, shapes)."""


class UsageError(AltCLIPError):
    """A wrong command line or input: exit status 2."""

    exit_code = 2
