"""Data: sources -> stratified splits -> data facts -> normalize/augment pipelines -> loaders."""
from safetrain.data.pipelines import (AUGMENTS, MIXES, Augment, BatchPipeline, Normalize, flips, hard_labels,
                                      make_loader, pick_images, resized_crops, resolve_augment, uint8_batches)
from safetrain.data.sources import (SOURCES, DataSpec, Decoding, ImageSet, Source, joined_labels, load_dataset,
                                    load_source)
from safetrain.data.splits import (class_counts, describe, duplicates_finding, exact_duplicates, hold_out,
                                   long_tailed, make_splits, refuse_duplicates, split_source, stratified_split,
                                   thin_eval_classes)
from safetrain.data.stats import DataFacts, channel_stats, measure_facts

__all__ = ["AUGMENTS", "MIXES", "Augment", "hard_labels", "resized_crops", "resolve_augment", "BatchPipeline",
           "Normalize", "flips", "make_loader", "pick_images", "uint8_batches",
           "SOURCES", "DataSpec", "Decoding", "ImageSet", "split_source",
           "Source", "joined_labels", "load_dataset", "load_source", "class_counts", "describe", "duplicates_finding",
           "exact_duplicates", "hold_out", "long_tailed", "make_splits", "refuse_duplicates", "stratified_split",
           "thin_eval_classes", "DataFacts", "channel_stats", "measure_facts"]
