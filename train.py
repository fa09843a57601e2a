"""`composer train.py <yaml> [key=value ...]`: llm-foundry training with composer_shear's parts registered
(through the package's entry points)."""

import sys

from llmfoundry.command_utils import train_from_yaml
from omegaconf import OmegaConf

from composer_shear._console import quiet_known_warnings

if __name__ == '__main__':
    try:  # the model, to know whether transformers' "lm_head.weight newly initialized" is a false alarm
        cfg = OmegaConf.merge(OmegaConf.load(sys.argv[1]), OmegaConf.from_cli(sys.argv[2:]))
        model_dir = OmegaConf.select(cfg, 'model.pretrained_model_name_or_path', throw_on_missing=False)
    except Exception:  # llm-foundry reports a bad YAML itself
        model_dir = None
    quiet_known_warnings(model_dir)
    train_from_yaml(sys.argv[1], sys.argv[2:])
