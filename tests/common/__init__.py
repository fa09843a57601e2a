"""Helpers shared by the tests that are specific to this suite (training scripts the launcher runs as modules).

The general tiny-model helpers live in `composer_shear.testing`."""

import importlib.util
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent.parent / 'bench'


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py imported as a module (bench/ is not a package; its scripts import each other by name, as they
    do when run from bench/)."""
    import sys
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
