"""Workflows: whole jobs built from the layers below (the demo pipeline, the default-model recipe, adapting a model to a lab, counting whole fields)."""

from .adapt import adapt_model
from .count import count_fields
from .pipeline import PROFILES, packaged_config, run_pipeline
from .recipe import ExportSettings, RecipeConfig, load_recipe, run_recipe

__all__ = ["adapt_model", "count_fields", "PROFILES", "packaged_config", "run_pipeline", "ExportSettings", "RecipeConfig", "load_recipe", "run_recipe"]
