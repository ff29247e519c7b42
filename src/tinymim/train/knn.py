"""Weighted k-NN classification on frozen features, the usual self-supervised protocol.

For a query feature q and training features x_i (all L2-normalized), the k nearest neighbours by
cosine similarity s_i = q . x_i vote for their labels with weight exp(s_i / T):

    score(c) = sum_{i in top-k} exp(s_i / T) [y_i = c],     prediction = argmax_c score(c)

with k = 20 and T = 0.07 by default (InstDisc / DINO).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinymim.data.classification import ClassifyDataConfig, build_eval_loader
from tinymim.data.sources import fixed_sample
from tinymim.train.bookkeeping import evaluation_bar


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, device: torch.device,
                     desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (model(x) of a head-less timm ViT) and labels of a whole loader; with `desc`, a
    progress bar over its images (main process)."""
    model.eval()
    feats, labels = [], []
    for batch in evaluation_bar(loader, desc or "", desc is not None):
        feats.append(model(batch["image"].to(device)).float().cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_query x num_classes) of the weighted k-NN vote."""
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for q in F.normalize(query.float(), dim=1).split(chunk):
        with torch.autocast(q.device.type, enabled=False):  # full-precision similarities
            sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of the weighted k-NN classifier."""
    pred = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature).argmax(1)
    return 100.0 * (pred == test_labels).float().mean().item()


# ---------------------------------------------------------------------------------------------
# k-NN monitoring during pre-training, and the `tinymim knn` command



@dataclass
class KNNMonitorConfig:
    """k-NN accuracy of the model being pre-trained, every `every_epochs` epochs (0 = off)."""

    every_epochs: int = 0  # run the k-NN monitor every N epochs; 0: never
    name: str = "folder"  # folder | shards | cifar10 | cifar100 | synthetic (labelled data)
    root: str | None = None  # the labelled bank (a training split)
    val_root: str | None = None  # the queries (a validation split)
    bank_size: int | None = 5000  # a fixed random sample of N images of the bank (None: all)
    val_size: int | None = 1000  # a fixed random sample of N queries (None: all)
    img_size: int | None = None  # None: the training data's
    k: int = 20  # neighbours that vote
    temperature: float = 0.07  # vote weight exp(similarity / temperature)
    batch_size: int = 256  # feature-extraction batch size


def _sample(loader, n: int | None):
    """Keep a fixed random sample of n images of an evaluation loader (a Subset underneath), in order.
    Not the first n: a folder tree lists its images class by class."""
    if n is not None and n < len(loader.dataset):
        indices = list(loader.dataset.indices)
        loader.dataset.indices = [indices[i] for i in fixed_sample(len(indices), n)]
    return loader


def _eval_crop_pct(img_size: int) -> float:
    return 1.0 if img_size <= 64 else 0.875  # small images: no center crop


def knn_loader_accuracy(features: torch.nn.Module, bank, queries, device: torch.device, k: int = 20,
                        temperature: float = 0.07, progress: bool = True) -> dict:
    """k-NN top-1 of `features` with `bank` as labelled neighbours and `queries` to classify; a progress
    bar over each while their features are computed."""
    fb, yb = extract_features(features, bank, device, "k-NN bank" if progress else None)
    fv, yv = extract_features(features, queries, device, "k-NN queries" if progress else None)
    num_classes = int(max(yb.max(), yv.max())) + 1
    return {"knn_top1": knn_accuracy(fb, yb, fv, yv, num_classes, k, temperature), "bank": len(fb),
            "queries": len(fv)}


class KNNMonitor:
    def __init__(self, cfg: KNNMonitorConfig, data_cfg):
        self.cfg = cfg
        size = cfg.img_size or data_cfg.img_size
        self.data = ClassifyDataConfig(
            name=cfg.name, root=cfg.root, val_root=cfg.val_root, img_size=size,
            mean=list(data_cfg.mean), std=list(data_cfg.std), num_workers=min(data_cfg.num_workers, 4),
            eval_crop_pct=_eval_crop_pct(size), synthetic_size=getattr(data_cfg, "synthetic_size", 2048),
            shard_cache=getattr(data_cfg, "shard_cache", None))
        self.loaders = None

    def due(self, epoch: int) -> bool:
        return self.cfg.every_epochs > 0 and epoch % self.cfg.every_epochs == 0

    def __call__(self, features: torch.nn.Module, device: torch.device) -> dict:
        if self.loaders is None:  # built on first use: monitoring that never runs costs nothing
            self.loaders = (
                _sample(build_eval_loader(self.data, self.cfg.batch_size, split_train=True), self.cfg.bank_size),
                _sample(build_eval_loader(self.data, self.cfg.batch_size), self.cfg.val_size))
        result = knn_loader_accuracy(features, *self.loaders, device, self.cfg.k, self.cfg.temperature)
        return {"knn_top1": result["knn_top1"]}
