"""Exceptions raised by rollnet."""

from __future__ import annotations

__all__ = ["UnsupportedOperationError"]


class UnsupportedOperationError(ValueError):
    """The model calls an operation rollnet cannot linearize exactly.

    Raised while the model runs, with the path of the module that made the
    call (``""`` for the top-level module) and the name of the operation, so
    the message points at the layer to change.

    Attributes:
        module_path: dotted path of the innermost module running when the call
            was made, as in ``model.named_modules()``.
        op: name of the torch function that was refused.
    """

    def __init__(self, module_path: str, op: str, reason: str) -> None:
        where = f"module '{module_path}'" if module_path else "the top-level module"
        super().__init__(f"{where} calls {op}: {reason}")
        self.module_path = module_path
        self.op = op
        self.reason = reason
