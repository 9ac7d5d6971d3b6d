"""Recipes: the parts of a training step, wired differently for each method.

A recipe is a :class:`~agentrl.recipes.base.Recipe` subclass: ``collect`` (rollouts), ``score``
(reward terms on top of the env's), ``select`` (which trajectories train), ``loss_batches`` (the
on-policy batch and any extra ones, such as SPEAR's replay), ``after_update`` (bookkeeping on what
the update used) and ``state_dict`` for exact resume. Built-ins by name, any other by import path.
"""

from __future__ import annotations

import difflib
import importlib

BUILTIN_RECIPES = {
    "default": "agentrl.recipes.base:Recipe",
    "drbot": "agentrl.recipes.drbot:DrBoTRecipe",
    "spear": "agentrl.recipes.spear:SpearRecipe",
    "self_play": "agentrl.recipes.self_play:SelfPlayRecipe",
}


def get_recipe_class(name_or_path: str):
    """A recipe class by built-in name (``spear``) or import path (``my_pkg.recipes:MyRecipe``)."""
    from agentrl.recipes.base import Recipe

    path = BUILTIN_RECIPES.get(name_or_path, name_or_path)
    if ":" not in path:
        close = difflib.get_close_matches(name_or_path, list(BUILTIN_RECIPES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise LookupError(f"unknown recipe '{name_or_path}'; {hint}built-in recipes: {', '.join(BUILTIN_RECIPES)}; "
                          "or give an import path like my_pkg.recipes:MyRecipe")
    module_name, _, attribute = path.partition(":")
    cls = getattr(importlib.import_module(module_name), attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        raise LookupError(f"'{path}' is not a Recipe subclass")
    return cls
