"""Data sources: official archives, IDX files and image folders, all as one ``Dataset``."""
from cnnlab.data.dataset import Dataset, Split, prepare_splits, stratified_indices

__all__ = ["Dataset", "Split", "prepare_splits", "stratified_indices"]
