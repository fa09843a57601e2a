"""llm-foundry builds our parts by name through the package's entry points."""

import pytest
from llmfoundry.utils.builders import build_algorithm, build_callback

from composer_shear.algorithm import ShearPruning
from composer_shear.callbacks import PruningMonitor


def test_entry_points_resolve():
    algo = build_algorithm('shear_pruning', {'target': {'preset': '1.3b'}, 'lagrangian_warmup': '640ba'})
    assert isinstance(algo, ShearPruning) and algo.warmup.value == 640
    assert isinstance(build_callback('pruning_monitor', {}), PruningMonitor)


def test_unknown_key_is_named():
    with pytest.raises(TypeError, match='pruning_module'):
        build_algorithm('shear_pruning', {'target': {'preset': '1.3b'}, 'pruning_module': ['head']})


def test_dynamic_loading_parts_resolve():
    from llmfoundry import registry

    from composer_shear.data.callback import DynamicLoading
    from composer_shear.data.dynamic import build_dynamic_text_dataloader
    assert registry.dataloaders.get('dynamic_text') is build_dynamic_text_dataloader
    from composer_shear.data.dynamic import build_domain_eval_dataloader
    assert registry.dataloaders.get('domain_eval') is build_domain_eval_dataloader
    cb = build_callback('dynamic_loading', {'domains': ['a', 'b'], 'initial_proportions': [0.5, 0.5],
                                            'reference_loss': [1.0, 2.0]})
    assert isinstance(cb, DynamicLoading)
