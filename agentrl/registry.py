"""Classes found by built-in name or by import path, for envs and recipes alike."""

from __future__ import annotations

import difflib
import importlib


def load_class(name_or_path: str, builtins: dict[str, str], base: type, kind: str, example: str) -> type:
    """The ``base`` subclass ``builtins[name_or_path]`` or at the import path ``module:Class``.

    An unknown name raises LookupError naming the closest built-in and ``example`` (an import path
    of the right shape); a path to anything but a ``base`` subclass raises LookupError too."""
    path = builtins.get(name_or_path, name_or_path)
    if ":" not in path:
        close = difflib.get_close_matches(name_or_path, list(builtins), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise LookupError(f"unknown {kind} '{name_or_path}'; {hint}built-in {kind}s: {', '.join(builtins)}; "
                          f"or give an import path like {example}")
    module_name, _, attribute = path.partition(":")
    cls = getattr(importlib.import_module(module_name), attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        article = "an" if base.__name__[0] in "AEIOU" else "a"
        raise LookupError(f"'{path}' is not {article} {base.__name__} subclass")
    return cls
