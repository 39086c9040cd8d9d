"""The failures a stage reports in one line, and the exit code that asks for a retry.

- `ConfigError`: params.yaml is missing a key, has an unknown one, or holds a value of the wrong type or
  outside its allowed values (raised while params are loaded, before any stage works).
- `InputError`: an input file is malformed; the message names the file, line and field.
- `StageError`: anything else a person can act on (a missing output of an earlier stage, an impossible
  setting for this machine).
`stages.common.cli.run_stage` turns each into `[stage] error: <message>` and exit code 1; other OS errors
exit `TRANSIENT_EXIT`, which the retrain flow retries.
"""

from __future__ import annotations

TRANSIENT_EXIT = 75  # EX_TEMPFAIL in sysexits.h: try again later


class ConfigError(ValueError):
    """params.yaml is missing a key, has an unknown one, or holds a value of the wrong type or range."""


class InputError(ValueError):
    """An input file is malformed; the message names the file and line."""


class StageError(RuntimeError):
    """A failure the user can act on: bad input, a missing file, an impossible setting."""
