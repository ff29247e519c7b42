"""MAE pre-training (He et al. 2022) of a timm ViT encoder, on the shared engine.

Random masking of `mask_ratio` of the patches per image; the encoder sees only the visible ones (plus
the class token); a light transformer decoder fills in mask tokens and predicts the pixels of every
patch; the loss is the mean squared error on the masked patches, optionally against per-patch
normalized pixels. Position embeddings are fixed 2-D sin-cos in encoder and decoder.
The encoder is written out as a timm VisionTransformer state dict: RUN_DIR/encoder.safetensors.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tinymim.core.config import checked_copy
from tinymim.data.pretrain import DataConfig, plain_view, with_device_images
from tinymim.method.mae import DecoderConfig, MaskedAutoencoder
from tinymim.models.checkpoint import save_weights
from tinymim.models.vit import ModelConfig, TokenFeatures, check_input_size, create_vit
from tinymim.tasks.base import Task, TaskSpec, resolves_once
from tinymim.train.config import TrainConfig
from tinymim.train.knn import KNNMonitor, KNNMonitorConfig


@dataclass
class MAEConfig:
    # MAE's encoder: its own init and a fixed sin-cos position embedding
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="vit_base_patch16_224", init="mae",
                                                                   pos_embed="sincos"))
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    mask_ratio: float = 0.75  # fraction of patches removed from the encoder's input (MAE: 0.75)
    norm_pix_loss: bool = True  # reconstruct per-patch normalized pixels (MAE's default)
    data: DataConfig = field(default_factory=lambda: DataConfig(color_jitter=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=800, batch_size=4096, blr=1.5e-4, warmup_epochs=40, weight_decay=0.05))
    knn: KNNMonitorConfig = field(default_factory=KNNMonitorConfig)

    def validate(self) -> None:
        check_input_size(self.model, self.data.img_size, "model")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.model.pos_embed != "sincos":  # MaskedAutoencoder fixes the table: a learned one would be ignored
            raise ValueError(f"model.pos_embed={self.model.pos_embed} cannot apply to MAE pre-training, which uses "
                             "MAE's fixed sin-cos table; leave model.pos_embed=sincos")


class MAETask(Task):
    """MAE pre-training of a ViT encoder (masked patches reconstructed), monitored by k-NN accuracy."""

    name = "mae"
    weights = "encoder.safetensors"

    def __init__(self, mae: MaskedAutoencoder, config: MAEConfig):
        super().__init__(mae)
        self.mae, self.data_cfg, self.config = mae, config.data, config
        self.prefetch_depth = config.data.prefetch  # the next batch's images built while this one trains
        self.knn = KNNMonitor(config.knn, config.data) if config.knn.every_epochs else None

    def prefetch(self, batch: dict) -> dict:
        return with_device_images(batch, self.data_cfg, self.device)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.trainable_forward(plain_view(batch, self.data_cfg, self.device))}

    def evaluate(self, epoch: int) -> dict | None:
        """k-NN accuracy of the encoder's features (average of its final patch tokens) when due."""
        if self.knn is None or not self.knn.due(epoch):
            return None
        return self.knn(TokenFeatures(self.mae.encoder), self.device)

    def export(self, run_dir: Path) -> None:
        meta = {"format": "timm.VisionTransformer", "model": json.dumps(asdict(self.config.model))}
        save_weights(self.mae.encoder.state_dict(), Path(run_dir) / self.weights, meta)


@resolves_once
def resolve(cfg: MAEConfig) -> MAEConfig:
    """A copy of `cfg` with its derived key filled: the encoder's input size is the data's."""
    cfg = checked_copy(cfg)  # validated, as a loaded config is
    if cfg.model.img_size is None:
        cfg.model.img_size = cfg.data.img_size
    return cfg


def build_mae_task(cfg: MAEConfig) -> MAETask:
    cfg = resolve(cfg)
    encoder = create_vit(cfg.model)
    return MAETask(MaskedAutoencoder(encoder, cfg.decoder, cfg.mask_ratio, cfg.norm_pix_loss), cfg)


SPEC = TaskSpec(task=MAETask, config=MAEConfig, resolve=resolve, build=build_mae_task,
                trained=lambda cfg: create_vit(cfg.model), checkpoint_prefix="encoder.", kind="pretrain",
                upstream=None,
                exports="encoder", help="MAE pre-training of a ViT (a teacher for distillation)")
