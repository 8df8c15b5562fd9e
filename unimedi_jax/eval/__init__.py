"""Downstream evaluation: linear probing, fine-tuning, segmentation, retrieval, zero-shot and
slice selection, and the evaluation during pretraining (docs/DESIGN.md §7, §9)."""
