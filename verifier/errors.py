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
