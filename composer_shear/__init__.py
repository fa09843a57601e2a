"""composer_shear: Sheared-LLaMA targeted structured pruning and dynamic batch loading for the MosaicML stack."""

__version__ = '0.1.0'
