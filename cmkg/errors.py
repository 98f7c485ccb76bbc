"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input from the user: a config, a YAML file, a data folder, an argument."""

    exit_code = 2


class ConfigError(UserError):
    """A config that fails to load or validate; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid config ({source}):\n{lines}")


class DataError(UserError):
    """A dataset folder, shard or manifest that is missing, corrupt or of the wrong kind."""


class NumericalError(RuntimeError):
    """A loss or gradient became NaN/Inf; names the stage, iteration and term."""
