"""tinymim: pre-train small Vision Transformers by distilling the token relations of a masked-image-
modeling teacher (TinyMIM, CVPR 2023), then fine-tune and evaluate them.

The public API (imported lazily: `import tinymim` stays cheap):

- the method: `RelationLoss`, `relation_logits`, `relation_kl`, `split_heads` (method/relations), `block_qkv`
  (method/attention: Q, K, V as a block's attention uses them)
- in your own loop: `RelationDistillation(teacher_vit, student_vit, target_block)`, `FrozenTeacher`,
  `RelationStudent` (models/distillation); `RelationDistillationTask(student, teacher, target_block)`, the same
  as a `timm.task.TrainingTask` for a timm training loop (models/timm_task)
- models and weights: `ModelConfig`, `create_vit`, `load_vit` (a run directory, a shipped teacher
  `builtin:NAME`, or a file with its timm architecture), `load_weights`, `load_vit_weights`
- whole tasks: `load_config(task, recipe, overrides)` and `run(task, config, output)`, as the command line
  runs them (tasks: distill, mae, finetune, linprobe, segment); `load_trained(run_dir, best=False)`: any
  run directory's trained model, config and class names
- your own images in one call: `distill(data="images/", teacher="builtin:cifar10_mae_vit128x6",
  student="vit_tiny_patch16_224", output="runs/mine")`, every other setting derived and printed, the
  student exported as a timm folder (pipeline/own_images)
"""

__version__ = "0.1.0"

_EXPORTS = {
    "RelationLoss": "tinymim.method.relations", "relation_logits": "tinymim.method.relations",
    "relation_kl": "tinymim.method.relations", "split_heads": "tinymim.method.relations",
    "block_qkv": "tinymim.method.attention", "RELATION_NAMES": "tinymim.method.relations",
    "RelationDistillation": "tinymim.models.distillation", "FrozenTeacher": "tinymim.models.distillation",
    "RelationStudent": "tinymim.models.distillation", "RelationDistillationTask": "tinymim.models.timm_task",
    "ModelConfig": "tinymim.models.vit", "create_vit": "tinymim.models.vit",
    "load_weights": "tinymim.models.checkpoint", "load_vit_weights": "tinymim.models.checkpoint",
    "load_vit": "tinymim.evaluate.exportable",
    "load_config": "tinymim.tasks", "run": "tinymim.tasks", "load_trained": "tinymim.tasks",
    "distill": "tinymim.pipeline.own_images",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tinymim' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
