"""Recipes: the parts of a training step, wired differently for each method.

A recipe is a :class:`~agentrl.recipes.base.Recipe` subclass: ``collect`` (rollouts), ``score``
(reward terms on top of the env's), ``select`` (which trajectories train), ``loss_batches`` (the
on-policy batch and any extra ones, such as SPEAR's replay), ``after_update`` (bookkeeping on what
the update used) and ``state_dict`` for exact resume. Built-ins by name, any other by import path.
"""

from __future__ import annotations

BUILTIN_RECIPES = {
    "default": "agentrl.recipes.base:Recipe",
    "drbot": "agentrl.recipes.drbot:DrBoTRecipe",
    "spear": "agentrl.recipes.spear:SpearRecipe",
    "self_play": "agentrl.recipes.self_play:SelfPlayRecipe",
}


def get_recipe_class(name_or_path: str):
    """A recipe class by built-in name (``spear``) or import path (``my_pkg.recipes:MyRecipe``)."""
    from agentrl.recipes.base import Recipe
    from agentrl.registry import load_class

    return load_class(name_or_path, BUILTIN_RECIPES, Recipe, "recipe", "my_pkg.recipes:MyRecipe")
