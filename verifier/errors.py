"""Exceptions of the verifier. Every message names the node, op, file or line at fault."""


class VerifierError(Exception):
    """Base class of every error the verifier raises on purpose."""


class ModelLoadError(VerifierError):
    """A model file is missing, unreadable, corrupt or cannot be converted."""


class UnsupportedOpsError(VerifierError):
    """The graph holds operators (or attributes) that have no bound rule.

    ``problems`` lists every one of them as ``(node_name, description)``.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [f"  - {name}: {what}" for name, what in self.problems]
        super().__init__(
            f"{len(self.problems)} unsupported operation(s) in the graph:\n" + "\n".join(lines))


class ShapeError(VerifierError):
    """An input, spec or perturbation does not fit the model's shapes."""


class PerturbationError(VerifierError):
    """An invalid perturbation set (eps < 0, lower > upper, NaN, bad norm)."""


class DomainError(VerifierError):
    """The input interval of an element-wise function leaves the function's domain (e.g. ``log``
    or ``rsqrt`` over an interval that reaches 0 or below), or its bounds overflow the dtype:
    no finite sound bound exists there. ``node``, ``op``: where; ``lower``, ``upper``: the
    worst element's input interval; ``domain``: what the function needs (e.g. "x > 0")."""

    def __init__(self, node: str, op: str, domain: str, lower: float, upper: float,
                 count: int = 1, total: int = 1, why: str = ""):
        self.node, self.op, self.domain = node, op, domain
        self.lower, self.upper, self.count, self.total = lower, upper, count, total
        what = why or f"its input interval leaves the domain {domain}"
        super().__init__(
            f"node {node!r} ({op}): {what}: input range [{lower:.6g}, {upper:.6g}] "
            f"({count} of {total} element(s) affected); tighter input bounds (a smaller "
            "perturbation, or CROWN's intermediate bounds instead of IBP) may avoid it")


class MissingDependencyError(VerifierError):
    """A third-party package that a feature needs is not installed (``verifier.deps.require``).
    ``module``: what failed to import; ``package``: its pip name; ``install``: the command that
    installs it. The command line prints it as one ``error: ...`` line, exit status 2."""

    def __init__(self, purpose: str, module: str, package: str, install: str, cause: str = ""):
        self.purpose, self.module, self.package, self.install = purpose, module, package, install
        why = f" ({cause})" if cause and cause != f"No module named '{module}'" else ""
        super().__init__(f"{purpose} needs the Python package {package}, which is not "
                         f"installed{why}; install it with: {install}")


class DeviceError(VerifierError):
    """A device that cannot be used: a malformed name, or ``cuda`` where no GPU is visible
    (``verifier.devices.resolve_device``). The command line prints it as one ``error: ...``
    line, exit status 2, before any work."""
