"""Helpers shared by the tests that are specific to this suite (training scripts the launcher runs as modules).

The general tiny-model helpers live in `composer_shear.testing`."""
