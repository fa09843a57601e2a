"""Data for pruning and continued pre-training: preparation, the dynamic multi-domain loader, domain weights."""
