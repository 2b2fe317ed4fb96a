"""Model registry: small entry points that set arguments, looked up by name (timm's pattern)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # models.py registers its entry points here, so it imports this module
    from .models import ImageTextEncoder

_ENCODERS: dict[str, Callable] = {}


def register_encoder(fn: Callable) -> Callable:
    """Register ``fn`` under its own name; it takes keyword-only arguments and returns an encoder."""
    if fn.__name__ in _ENCODERS:
        raise ValueError(f"encoder {fn.__name__!r} is registered twice")
    _ENCODERS[fn.__name__] = fn
    return fn


def list_encoders() -> list[str]:
    return sorted(_ENCODERS)


def create_encoder(name: str, **kwargs: Any) -> ImageTextEncoder:
    """Build the registered encoder ``name`` (a family such as ``clip``, or a ``tiny_*`` test variant)."""
    try:
        entry = _ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; registered: {', '.join(list_encoders())}") from None
    return entry(**kwargs)
