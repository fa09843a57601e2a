"""Fixtures shared by several test modules."""

import pytest

from composer_shear.testing import tiny_tokenizer


@pytest.fixture
def tok_dir(tmp_path):
    """The tiny character tokenizer saved to a folder (what prepare-data reads)."""
    tiny_tokenizer().save_pretrained(tmp_path / 'tok')
    return str(tmp_path / 'tok')
