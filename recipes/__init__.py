"""Recipe schema and loader. Importing this package must stay light: no torch."""
from .loader import Problem, RecipeError, load_recipe
from .schema import SECTIONS, Recipe

__all__ = ["Problem", "Recipe", "RecipeError", "SECTIONS", "load_recipe"]
