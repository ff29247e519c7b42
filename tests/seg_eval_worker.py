"""Evaluate a fixed random segmenter on a small folder and print the metrics as JSON (rank 0), alone or
under torchrun: the test compares the two."""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.utils.data as tud

from tinymim.data.segmentation import SegmentationDataset, SegmentationFolder, SegmentDataConfig, collate_segment
from tinymim.models.segmenter import Segmenter
from tinymim.models.vit import ModelConfig, create_vit
from tinymim.tasks.segment_eval import evaluate_segmenter

root = sys.argv[1]
if "RANK" in os.environ:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
torch.manual_seed(0)
vit = create_vit(ModelConfig(name="vit_custom", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2))
model = Segmenter(vit, 4, (1, 2, 3, 4), channels=16, aux_channels=8)
cfg = SegmentDataConfig(root=root, num_classes=4, ignore_index=255, scale=[48, 32], crop_size=32, eval_stride=21,
                        eval_mode="slide")
val = SegmentationDataset(SegmentationFolder(cfg, "val"), cfg, train=False)
loader = tud.DataLoader(tud.Subset(val, range(rank, len(val), world)), batch_size=1, collate_fn=collate_segment)
metrics = evaluate_segmenter(model, loader, cfg, torch.device("cpu"))
if rank == 0:
    print("METRICS " + json.dumps(metrics))
if dist.is_initialized():
    dist.destroy_process_group()
