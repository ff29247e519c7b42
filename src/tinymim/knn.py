"""Weighted k-NN classification on frozen features, the usual self-supervised protocol.

For a query feature q and training features x_i (all L2-normalized), the k nearest neighbours by
cosine similarity s_i = q . x_i vote for their labels with weight exp(s_i / T):

    score(c) = sum_{i in top-k} exp(s_i / T) [y_i = c],     prediction = argmax_c score(c)

with k = 20 and T = 0.07 by default (InstDisc / DINO).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (model(x) of a head-less timm ViT) and labels of a whole loader."""
    model.eval()
    feats, labels = [], []
    for batch in loader:
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
