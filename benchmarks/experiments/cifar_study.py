"""What the CIFAR-10 studies share (micro_study.py, findings.py, baseline_grid.py): the data, the
teacher pairing, model shapes as overrides, cached k-NN scores and the mean ± std cell."""
from __future__ import annotations

import json
import statistics
import sys
import tarfile
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[2].parent / "shared"  # beside the project
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
ARCHITECTURE = ("name", "img_size", "patch_size", "embed_dim", "depth", "num_heads")


def extract(data: Path, cache: Path, splits: tuple[str, ...] = ("train", "test")) -> list[Path]:
    """data/<split>.tar extracted once into cache/<split> (ImageFolders); their paths."""
    for split in splits:
        if not (cache / split).is_dir():
            tar = data / f"{split}.tar"
            if not tar.is_file():
                sys.exit(f"CIFAR-10 not found: {tar} (pass --data DIR holding "
                         f"{' and '.join(f'{s}.tar' for s in splits)})")
            with tarfile.open(tar) as t:
                t.extractall(cache, filter="data")
    return [cache / split for split in splits]


def shape(section: str, width: int, depth: int, heads: int) -> list[str]:
    """Overrides giving `section` (model, student) a width, depth and head count."""
    return [f"{section}.embed_dim={width}", f"{section}.depth={depth}", f"{section}.num_heads={heads}"]


def teacher_model(teacher: Path) -> dict:
    """The model section of a teacher run directory's config."""
    return yaml.safe_load((teacher / "config.yaml").read_text())["model"]


def teacher_pairing(teacher: Path) -> list[str]:
    """Overrides that make a run directory the teacher: its weights, architecture, and relations of its
    last block split into its own heads."""
    model = teacher_model(teacher)
    return [f"teacher.checkpoint={teacher.resolve()}", *(f"teacher.model.{k}={model[k]}" for k in ARCHITECTURE),
            f"teacher.target_block={model['depth']}", f"teacher.relation_heads={model['num_heads']}"]


def cached_knn(run: Path, train: Path, test: Path, block: int, workers: int, bank: int | None) -> float:
    """k-NN top-1 of a run's frozen features entering `block`, cached in run/knn.json (recomputed when
    the cache used another bank size)."""
    from tinymim.evaluate.robustness import knn_evaluate

    cache = run / "knn.json"
    stale = cache.is_file() and bank and json.loads(cache.read_text())["bank"] != bank
    if not cache.is_file() or stale:
        r = knn_evaluate(run, train, test, block=block, mean=CIFAR_MEAN, std=CIFAR_STD, num_workers=workers,
                         bank_size=bank or None)
        cache.write_text(json.dumps(r))
    return json.loads(cache.read_text())["knn_top1"]


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"
