"""Data: sources -> stratified splits -> data facts -> normalize/augment pipelines -> loaders."""
from safetrain.data.pipelines import BatchPipeline, Normalize, check_batch, make_loader, uint8_batches
from safetrain.data.sources import ImageSet, Source, load_dataset, load_source
from safetrain.data.splits import describe, exact_duplicates, long_tailed, make_splits, refuse_duplicates, stratified_split, thin_eval_classes
from safetrain.data.stats import DataFacts, channel_stats, measure_facts

__all__ = ["BatchPipeline", "Normalize", "make_loader", "uint8_batches", "check_batch", "ImageSet", "Source", "load_dataset", "load_source", "describe", "exact_duplicates", "refuse_duplicates", "long_tailed",
           "make_splits", "stratified_split", "thin_eval_classes", "DataFacts", "channel_stats", "measure_facts"]
