"""Recipe schema and loading: every section of a YAML recipe, with its defaults, validated before any work.

A leaf: imports pydantic, yaml and tunelab.errors, nothing else of tunelab and never torch (what needs the
methods, objectives or models is checked by tunelab/recipe.py, which loads recipes). `training.py` holds the training recipe (pretrain,
finetune), `ops.py` the model operations (merge, prune, average), `loading.py` YAML, `--set` overrides,
error messages and `RECIPE_KINDS`. Everything is importable from `tunelab.config`.
"""

from tunelab.config.base import Section, did_you_mean
from tunelab.config.loading import (RECIPE_KINDS, RECIPES_DIR, YamlLoader, apply_overrides, dump_config,
                                    expand_shorthands, format_validation_error, is_recipe, load_yaml, parse_override,
                                    read_yaml, resolve_recipe_path, validate, validate_kind)
from tunelab.config.ops import (MERGE_METHODS, MERGE_NEEDS_BASE, PRUNE_METHODS, STRUCTURED, UNSTRUCTURED,
                                AverageRecipe, Calibration, Lottery, MergeEval, MergeInput, MergeOptions, MergeRecipe,
                                MergeSweep, PruneRecipe)
from tunelab.config.training import (DataConfig, FinetuneRecipe, MethodConfig, MixturePhase, ModelConfig,
                                     PretrainRecipe, RecipeConfig, ReplayConfig, ScheduleConfig, SourceSpec,
                                     TokenizerConfig, TrainConfig, TrainingRecipe, _as_source_list)

__all__ = ["Section", "did_you_mean", "RECIPE_KINDS", "RECIPES_DIR", "YamlLoader", "apply_overrides", "dump_config",
           "expand_shorthands", "format_validation_error", "is_recipe", "load_yaml", "parse_override",
           "read_yaml", "resolve_recipe_path", "validate", "validate_kind", "MERGE_METHODS", "MERGE_NEEDS_BASE",
           "MergeEval", "MergeInput", "MergeOptions", "MergeRecipe", "MergeSweep", "PRUNE_METHODS", "STRUCTURED",
           "UNSTRUCTURED", "AverageRecipe", "Calibration", "Lottery", "PruneRecipe", "DataConfig", "FinetuneRecipe",
           "MethodConfig", "MixturePhase", "ModelConfig", "PretrainRecipe", "RecipeConfig", "ReplayConfig",
           "ScheduleConfig", "SourceSpec", "TokenizerConfig", "TrainConfig", "TrainingRecipe", "_as_source_list"]
