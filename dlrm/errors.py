"""The errors dlrm raises for bad input or unusable state, one class per kind, each message
naming the file, line, key or request field at fault. The command line turns each into a
clear message and exit status 2 (a traceback is for a bug)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the file, key or path at fault."""


class SchemaError(ValueError):
    """A schema file that cannot be used; the message names the file and the key."""


class PreprocessError(RuntimeError):
    """A fatal condition (missing input, unusable output, full disk); names the path."""


class DataError(ValueError):
    """A data file that does not match its manifest or fails its checksums; names it."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or a model directory that cannot be loaded;
    the message names the file."""
