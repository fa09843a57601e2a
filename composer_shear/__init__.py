"""composer_shear: Sheared-LLaMA targeted structured pruning and dynamic batch loading for the MosaicML stack.

The public API is imported lazily (``import composer_shear`` does not import torch or composer), so the CLI
answers fast and checks its arguments before any heavy import.

Example:
    >>> from composer_shear import apply_shear_pruning, prune_model, sample_masks
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = '0.1.0'

# public name -> the module that defines it (one source of truth for both __all__ and the lazy import)
_EXPORTS = {
    # functional API
    'apply_shear_pruning': 'composer_shear.functional',
    'sample_masks': 'composer_shear.functional',
    'set_eval_masks': 'composer_shear.functional',
    'clamp_masks': 'composer_shear.functional',
    'ascend_multipliers': 'composer_shear.functional',
    'prune_model': 'composer_shear.functional',
    'init_masks_from_importance': 'composer_shear.functional',
    'prune_oneshot': 'composer_shear.oneshot',
    'search_shapes': 'composer_shear.search',
    'parse_target': 'composer_shear.budget',
    'candidate_shapes': 'composer_shear.budget',
    'distillation_loss': 'composer_shear.kd',
    'load_teacher': 'composer_shear.kd',
    'load_teacher_sharded': 'composer_shear.kd',
    'teacher_forward': 'composer_shear.kd',
    'update_domain_weights': 'composer_shear.data.weights',
    # downstream evaluation (llm-foundry's ICL evaluator)
    'load_tasks': 'composer_shear.icl',
    'evaluate_models': 'composer_shear.icl',
    # Composer algorithm, callbacks, dataloader
    'ShearPruning': 'composer_shear.algorithm',
    'ShearDistill': 'composer_shear.distill',
    'PruningMonitor': 'composer_shear.callbacks',
    'DynamicLoading': 'composer_shear.data.callback',
    'build_dynamic_text_dataloader': 'composer_shear.data.dynamic',
    # data and export commands as functions
    'prepare': 'composer_shear.data.prepare',
    'reference_loss': 'composer_shear.data.reference',
    'export_checkpoint': 'composer_shear.export',
    'prune_folder': 'composer_shear.prune',
    # types, constants, errors
    'ShearMasks': 'composer_shear.masks',
    'MaskSnapshot': 'composer_shear.masks',
    'ModelShape': 'composer_shear.shapes',
    'PRESETS': 'composer_shear.shapes',
    'PRUNING_MODULES': 'composer_shear.shapes',
    'TARGET_FIELDS': 'composer_shear.shapes',
    'ConfigError': 'composer_shear.errors',
    'ExportError': 'composer_shear.errors',
    'ShapeError': 'composer_shear.errors',
    'Budget': 'composer_shear.budget',
    'SearchSpace': 'composer_shear.budget',
}

__all__ = [
    'Budget',
    'ConfigError',
    'DynamicLoading',
    'ExportError',
    'MaskSnapshot',
    'ModelShape',
    'PRESETS',
    'PRUNING_MODULES',
    'PruningMonitor',
    'SearchSpace',
    'ShapeError',
    'ShearDistill',
    'ShearMasks',
    'ShearPruning',
    'TARGET_FIELDS',
    'apply_shear_pruning',
    'ascend_multipliers',
    'build_dynamic_text_dataloader',
    'candidate_shapes',
    'clamp_masks',
    'distillation_loss',
    'evaluate_models',
    'export_checkpoint',
    'init_masks_from_importance',
    'load_tasks',
    'load_teacher',
    'load_teacher_sharded',
    'parse_target',
    'prepare',
    'prune_folder',
    'prune_model',
    'prune_oneshot',
    'reference_loss',
    'sample_masks',
    'search_shapes',
    'set_eval_masks',
    'teacher_forward',
    'update_domain_weights',
]  # the names of _EXPORTS (a test checks they agree)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from composer_shear.algorithm import ShearPruning
    from composer_shear.callbacks import PruningMonitor
    from composer_shear.data.callback import DynamicLoading
    from composer_shear.data.dynamic import build_dynamic_text_dataloader
    from composer_shear.data.prepare import prepare
    from composer_shear.data.reference import reference_loss
    from composer_shear.data.weights import update_domain_weights
    from composer_shear.distill import ShearDistill
    from composer_shear.errors import ConfigError, ExportError, ShapeError
    from composer_shear.export import export_checkpoint
    from composer_shear.functional import apply_shear_pruning, clamp_masks, prune_model, sample_masks, set_eval_masks
    from composer_shear.icl import evaluate_models, load_tasks
    from composer_shear.kd import distillation_loss, load_teacher, load_teacher_sharded, teacher_forward
    from composer_shear.masks import MaskSnapshot, ShearMasks
    from composer_shear.oneshot import prune_oneshot
    from composer_shear.shapes import PRESETS, PRUNING_MODULES, TARGET_FIELDS, ModelShape
