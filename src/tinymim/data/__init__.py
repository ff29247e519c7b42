"""Data: image decoding, pre-training sources and views, shards, labelled and segmentation data."""
