"""Training tasks: modules that turn a batch into a dict of named losses (timm.task style)."""
