"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2.

They cross process boundaries intact (Ray tasks, Ray Train workers pickle them back to the
driver): each class rebuilds from what it was constructed with."""


class UserError(Exception):
    """Bad input from the user: a config, a YAML file, a data folder, an argument."""

    exit_code = 2


class ConfigError(UserError):
    """A config that fails to load or validate; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid config ({source}):\n{lines}")

    def __reduce__(self):  # the default would call ConfigError(message)
        return (self.__class__, (self.source, self.problems))


class DataError(UserError):
    """A dataset folder, shard or manifest that is missing, corrupt or of the wrong kind."""


class NumericalError(UserError, RuntimeError):
    """A loss, gradient or phi became NaN/Inf; names the stage, epoch, step and term, and the
    config keys most likely responsible.

    A :class:`UserError`: it follows from the settings (a learning rate too high, a prior too
    strong), and rerunning the same config fails the same way; so it gets the one-line message
    and status 2, and Ray does not retry it. Still a ``RuntimeError`` for older callers."""


def unwrap_user_error(exc: BaseException | None) -> UserError | None:
    """The :class:`UserError` behind ``exc``, with its own class and message: ``exc`` itself, or
    the one that a Ray task raised (``RayTaskError.cause``; ``ray.get`` raises a RayTaskError
    that is also an instance of the cause's class, but whose message is a traceback), or that a
    Ray Train worker raised (``ControllerError.controller_failure``, the lowest rank's in
    ``WorkerGroupError.worker_failures``). None when no user error is behind it: a crash stays a
    crash. Reads the wrappers' attributes, so it needs no Ray import."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict):  # Ray Train: rank -> the worker's exception
            found = (unwrap_user_error(failures[r]) for r in sorted(failures))
            return next((e for e in found if e is not None), None)
        inner = next((getattr(exc, a) for a in ("cause", "controller_failure", "_base_exc")
                      if isinstance(getattr(exc, a, None), BaseException)), None)
        if inner is None:
            return exc if isinstance(exc, UserError) else None
        exc = inner
    return None
