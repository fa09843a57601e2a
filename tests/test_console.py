"""The quiet console: only the known-harmless messages are silenced, by message and module."""

import logging
import warnings

from composer_shear._console import quiet_known_warnings
from composer_shear.testing import save_tiny


def emitted(message, category, module):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('default')
        quiet_known_warnings()
        warnings.warn_explicit(message, category, 'x.py', 1, module=module)
    return [str(w.message) for w in seen]


def test_known_warnings_are_silenced_and_nothing_else():
    auth = 'The `use_auth_token` argument is deprecated and will be removed in v5 of Transformers.'
    pin = "'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used."
    assert emitted(auth, FutureWarning, 'transformers.models.auto.auto_factory') == []
    assert emitted(pin, UserWarning, 'torch.utils.data.dataloader') == []
    assert emitted(auth, FutureWarning, 'my_package') == [auth]  # the same text from elsewhere is kept
    assert emitted('something else', FutureWarning, 'transformers.modeling_utils') == ['something else']
    assert emitted(auth, UserWarning, 'transformers.x') == [auth]


def test_the_tied_head_message_is_dropped_only_for_a_tied_model(tmp_path, caplog):
    logger = logging.getLogger('transformers.modeling_utils')
    message = ('Some weights of LlamaForCausalLM were not initialized from the model checkpoint at m and are newly '
               "initialized: ['lm_head.weight']")
    try:
        quiet_known_warnings(save_tiny(tmp_path / 'untied', tied=False))
        with caplog.at_level(logging.WARNING, logger='transformers.modeling_utils'):
            logger.warning(message)
        assert message in caplog.text  # a real missing head is reported
        caplog.clear()
        quiet_known_warnings(save_tiny(tmp_path / 'tied', tied=True))
        with caplog.at_level(logging.WARNING, logger='transformers.modeling_utils'):
            logger.warning(message)
            logger.warning("newly initialized: ['model.norm.weight']")
        assert 'lm_head' not in caplog.text and 'model.norm.weight' in caplog.text
    finally:
        logger.filters.clear()
