"""Paired views against torchvision's own color transforms; global batches for any process count."""
import torch
from torchvision.transforms import functional as TF

from tinymim.data import DataConfig, GlobalBatchSampler, PairedViewDataset, SyntheticImages, color_jitter


def test_color_jitter_matches_torchvision_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g)
    factors = 0.6 + 0.8 * torch.rand(4, 3, generator=g)
    orders = torch.stack([torch.randperm(3, generator=g) for _ in range(4)])
    ours = color_jitter(x, factors, orders)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for i in range(4):
        ref = x[i]
        for op in orders[i].tolist():
            ref = ops[op](ref, float(factors[i, op]))
        assert torch.allclose(ours[i], ref, atol=1e-5), i


def test_global_batches_do_not_depend_on_process_count():
    one = GlobalBatchSampler(100, 8, rank=0, world=1, seed=3)
    two = [GlobalBatchSampler(100, 8, rank=r, world=2, seed=3) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(2)
    for b1, b2a, b2b in zip(one, *two):
        assert b1 == b2a + b2b  # same samples and the same per-sample seeds
    one.set_epoch(2, start_step=5)  # resuming mid-epoch yields the rest of the same epoch
    rest = list(one)
    one.set_epoch(2)
    assert rest == list(one)[5:] and len(rest) == 12 - 5


def test_views_are_a_function_of_the_sample_seed():
    ds = PairedViewDataset(SyntheticImages(16, 32), DataConfig(img_size=24))
    a, b = ds[(3, 12345)], ds[(3, 12345)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (3, 24, 24)
    assert not torch.equal(ds[(3, 999)][0], a[0])


def test_holdout_is_a_fixed_split_of_the_training_images():
    from tinymim.classification import ClassifyDataConfig
    from tinymim.classification import classify_source as _source

    cfg = ClassifyDataConfig(name="synthetic", synthetic_size=200, img_size=32, holdout=50, subset=100)
    train, held = _source(cfg, None, True), _source(cfg, None, False)
    assert len(held) == 50 and len(train) == 100
    held_ids = {held.indices[i] for i in range(len(held))}
    train_ids = {train.source.indices[j] for j in train.indices}  # the subset is drawn from the rest
    assert not held_ids & train_ids and held_ids == {_source(cfg, None, False).indices[i] for i in range(50)}
    labels = {held.load(i)[1] for i in range(len(held))}
    assert len(labels) > 5  # a random sample, not the first images (one class in a folder tree)


def test_knn_bank_is_a_random_sample_not_the_first_class():
    import torch.utils.data as tud

    from tinymim.knn import _sample

    labels = [c for c in range(10) for _ in range(100)]  # a folder tree: class by class
    loader = tud.DataLoader(tud.Subset(labels, range(len(labels))), batch_size=50)
    kept = [labels[i] for i in _sample(loader, 200).dataset.indices]
    assert len(kept) == 200 and len(set(kept)) == 10 and kept == sorted(kept)
