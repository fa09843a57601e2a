"""`composer train.py <yaml> [key=value ...]`: llm-foundry training with composer_shear's parts registered
(through the package's entry points)."""

import sys

from llmfoundry.command_utils import train_from_yaml

if __name__ == '__main__':
    train_from_yaml(sys.argv[1], sys.argv[2:])
