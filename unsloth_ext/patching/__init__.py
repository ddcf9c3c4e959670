"""Instance-scoped patching of transformers models.

`patch(model)` rebinds `forward` on the modules of this one model instance (instance attributes,
never class attributes), so other models in the process keep stock behaviour, and
`unpatch(model)` deletes those attributes again, restoring exactly the stock code. A registry
maps `config.model_type` to the function that patches that family; an unsupported model type or
setting gets one warning and runs stock code.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable

from unsloth_ext._extension import UnslothExtWarning

_RECORD_ATTR = "_unsloth_ext_patch"
_MISSING = object()


class PatchRecord:
    """What one patch() changed on a model instance, so unpatch() can put it back."""

    def __init__(self):
        self._changes: list[tuple[Any, str, Any]] = []
        self.patched: dict[str, int] = {}  # what was patched -> how many modules

    def set(self, obj: Any, name: str, value: Any) -> None:
        self._changes.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def bind(self, module: Any, fn: Callable, what: str, name: str = "forward") -> None:
        """Make fn the `name` method of this module instance only."""
        self.set(module, name, types.MethodType(fn, module))
        self.patched[what] = self.patched.get(what, 0) + 1

    def undo(self) -> None:
        for obj, name, old in reversed(self._changes):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._changes.clear()


def unwrap(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def warn_unsupported(what: str) -> None:
    warnings.warn(f"unsloth_ext: {what}; that part runs stock transformers/PEFT code.",
                  UnslothExtWarning, stacklevel=3)


def _patchers() -> dict[str, Callable]:
    from unsloth_ext.patching import llama

    return {"llama": llama.patch_llama, "mistral": llama.patch_llama}


def supported_model_types() -> tuple[str, ...]:
    return tuple(_patchers())


def patch(model):
    """Accelerate `model` (a transformers causal LM, optionally inside PEFT) in place."""
    base = unwrap(model)
    if getattr(base, _RECORD_ATTR, None) is not None:
        return model
    model_type = getattr(base.config, "model_type", None)
    patcher = _patchers().get(model_type)
    if patcher is None:
        warn_unsupported(f"model type {model_type!r} is not supported (supported: "
                         f"{', '.join(supported_model_types())})")
        return model
    record = PatchRecord()
    patcher(base, record)
    setattr(base, _RECORD_ATTR, record)
    return model


def unpatch(model):
    """Restore exactly the stock behaviour of a model patched by `patch`."""
    base = unwrap(model)
    record = getattr(base, _RECORD_ATTR, None)
    if record is not None:
        record.undo()
        delattr(base, _RECORD_ATTR)
    return model


def patch_report(model) -> dict[str, int]:
    """Which parts of the model run patched code, and how many modules of each."""
    record = getattr(unwrap(model), _RECORD_ATTR, None)
    return dict(record.patched) if record is not None else {}
