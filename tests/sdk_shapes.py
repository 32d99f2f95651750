"""What our responses may add to the official SDK's types, and how to find what they added."""

from __future__ import annotations

from pydantic import BaseModel

RESPONSE_EXTENSIONS = {"data.seed", "variant", "alias"}
"""Fields our responses add to OpenAI's (documented extensions); any other extra is a bug."""


def extra_fields(model: BaseModel, path: str = "") -> set[str]:
    """Dotted names of every field an SDK model received that its type does not declare."""
    extras = {f"{path}{name}" for name in (model.model_extra or {})}
    for name in type(model).model_fields:
        value = getattr(model, name)
        children = value if isinstance(value, list) else [value]
        for child in children:
            if isinstance(child, BaseModel):
                extras |= extra_fields(child, f"{path}{name}.")
    return extras
