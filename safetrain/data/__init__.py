"""Data: sources -> stratified splits -> data facts -> normalize/augment pipelines -> loaders."""
from safetrain.data.pipelines import BatchPipeline, Normalize, make_loader, uint8_batches
from safetrain.data.sources import ImageSet, Source, load_source
from safetrain.data.splits import describe, make_splits, stratified_split
from safetrain.data.stats import DataFacts, channel_stats, measure_facts

__all__ = ["BatchPipeline", "Normalize", "make_loader", "uint8_batches", "ImageSet", "Source", "load_source", "describe",
           "make_splits", "stratified_split", "DataFacts", "channel_stats", "measure_facts"]
