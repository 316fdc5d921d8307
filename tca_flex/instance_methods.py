"""Wrapping one of a model's methods on the instance (the class and other models keep theirs), and
undoing it.

``apply`` wraps two: ``forward`` (the padded prefill's note and let-go, ``unpad.py``) and
``prepare_inputs_for_generation`` (a ``TCACache``'s per-step bookkeeping, ``generate_hook.py``).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

# around(module, call, bound, args, kwargs): runs the wrapped method as call(*bound, *args, **kwargs).
Around = Callable[[Any, Callable[..., Any], tuple, tuple, dict[str, Any]], Any]


def wrap(model: Any, name: str, around: Around) -> tuple[Any, Any] | None:
    """Put a wrapper of ``model.<name>`` on the instance that runs ``around``; returns what ``unwrap``
    needs (the wrapper, and the instance's own method it wraps, another library's, or None where the
    class's runs), or None where the model has no such method.

    Where the class's method runs, the wrapper is bound to the model, not a closure over it: a deep
    copy of the model gets one bound to the copy. Either way ``inspect.signature`` sees the wrapped
    method's (transformers reads it to pick the kwargs it passes)."""
    own = model.__dict__.get(name)
    if own is not None:
        @functools.wraps(own)  # already bound (or taking no self): its signature is the one to show
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return around(model, own, (), args, kwargs)

        wrapper: Any = wrapped
    else:
        method = getattr(type(model), name, None)
        if method is None:
            return None

        @functools.wraps(method)
        def unbound(self: Any, *args: Any, **kwargs: Any) -> Any:
            return around(self, method, (self,), args, kwargs)

        wrapper = types.MethodType(unbound, model)
    setattr(model, name, wrapper)
    return wrapper, own


def unwrap(model: Any, name: str, installed: tuple[Any, Any] | None) -> None:
    """Undo ``wrap``, if its wrapper is still the model's (someone may have replaced it since)."""
    if installed is None:
        return
    wrapper, own = installed
    if model.__dict__.get(name) is wrapper:
        if own is not None:
            setattr(model, name, own)
        else:
            del model.__dict__[name]
