"""Command line: `tinymim <task> --config RECIPE.yaml --output RUN_DIR [section.key=value ...]`."""
# Longer than 300 lines because the command line is a layer of one module (tests/test_layers.py): the parser and
# each command's handler, which imports its layer lazily so that stop signals are noted first. (A comment, not
# the docstring: the docstring is the parser's description.)
from __future__ import annotations

import argparse
import logging
import re
import sys

from tinymim.core.errors import TinymimError, loader_worker_death
from tinymim.core.preempt import note_early, release_early


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (defaults are used where it is silent); "
                                    "`tinymim config TASK` lists every key")
    p.add_argument("--output", required=True, help="run directory; an existing one is resumed")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _add_own_images_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your own images in one call (--data, --teacher and --student; every other setting "
                             "derived and printed; overrides still apply)")
    g.add_argument("--data", metavar="DIR", help="a folder of images (flat or nested, no labels), a .tar/.zip of "
                   "them, an indexed shard folder or a brace pattern of shards")
    g.add_argument("--teacher", metavar="T", help="a tinymim run directory, a weights file, builtin:NAME (e.g. "
                   "builtin:cifar10_mae_vit128x6) or a timm/hub name with weights")
    g.add_argument("--student", metavar="S", help="a timm ViT name (e.g. vit_tiny_patch16_224: used at the data's "
                   "size, its patch fitted to the teacher's grid) or sizes, e.g. dim192,depth12,heads3,patch4")
    g.add_argument("--img-size", type=int, help="image size in pixels (default: derived)")
    g.add_argument("--batch-size", type=int, help="images per step (default: what fits memory, derived)")
    g.add_argument("--epochs", type=int, help="passes over the images (default: derived from their number)")


def cmd_own_images(args) -> int:
    """tinymim distill --data DIR --teacher T --student S --output OUT: pipeline/own_images.py."""
    missing = [f"--{k}" for k in ("data", "teacher", "student") if not getattr(args, k)]
    if missing:
        raise TinymimError(f"your own images in one call need --data, --teacher and --student; add "
                           f"{' and '.join(missing)} (or leave all three out and give --config RECIPE)")
    if args.config is not None:
        raise TinymimError("--data/--teacher/--student derive the recipe themselves: leave out --config (give "
                           "section.key=value overrides instead)")
    from tinymim.pipeline.own_images import distill

    distill(args.data, args.teacher, args.student, args.output, img_size=args.img_size,
            batch_size=args.batch_size, epochs=args.epochs, overrides=args.overrides)
    return 0


def cmd_train(args) -> int:
    """Load the task's config (recipe + overrides), train it, say what was written."""
    if any(getattr(args, k, None) is not None for k in ("data", "teacher", "student")):
        return cmd_own_images(args)
    given = [(flag, key) for flag, attr, key in (("--img-size", "img_size", "data.img_size"),
                                                 ("--batch-size", "batch_size", "train.batch_size"),
                                                 ("--epochs", "epochs", "train.epochs"))
             if getattr(args, attr, None) is not None]
    if given:  # these belong to the one-call form: with a recipe they would be dropped without a word
        raise TinymimError(f"{given[0][0]} goes with --data/--teacher/--student; with --config give "
                           f"{given[0][1]}=VALUE instead")
    from tinymim import tasks  # the config is checked before the task modules (torch, timm) are imported

    try:
        last = tasks.run(args.command, tasks.load_config(args.command, args.config, args.overrides), args.output)
    except TinymimError as e:
        if args.command == "distill" and args.config is None and type(e).__name__ == "MemoryFitError":
            raise TinymimError(f"{e}. Without --config these are the ImageNet recipe's defaults (ViT-B teacher, "
                               "224 px); for your own images: tinymim distill --data DIR --teacher T --student S "
                               "--output OUT, or start small with --config cifar10/distill_micro") from e
        raise
    weights = tasks.TASKS[args.command].weights
    if not _is_main_process():
        return 0
    if last is not None:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                            if k.startswith(("loss", "val_")) and isinstance(v, (int, float)))
        print(f"done: {args.output}/{weights} ({summary})")
    else:
        print(f"{args.output} already holds a finished run; nothing to do")
    return 0


def cmd_config(args) -> int:
    """Print a task's resolved config: every key, its value, its type and what it means."""
    import json

    from tinymim.core.config_docs import describe

    if args.task == "pipeline":
        from tinymim.pipeline import planning

        if args.config is None:
            raise TinymimError("tinymim config pipeline needs --config PIPELINE.yaml (or a built-in one)")
        cfg = planning.load(args.config, args.overrides)
    else:
        from tinymim.tasks import load_config

        cfg = load_config(args.task, args.config, args.overrides)
    rows = [(key, json.dumps(value), tp, doc) for key, tp, value, doc in _described(describe, cfg)]
    width = max(len(f"{k} = {v}") for k, v, _, _ in rows if len(f"{k} = {v}") <= 60)
    for key, value, tp, doc in rows:
        left = f"{key} = {value}"
        print(f"{left:<{width}}  # {tp}: {doc}")
    return 0


def _described(describe, cfg, prefix: str = "") -> list[tuple]:
    """describe()'s rows, a list of sections (a pipeline's stages) expanded item by item: stages[0].name ..."""
    import dataclasses

    rows = []
    for key, tp, value, doc in describe(type(cfg), cfg, prefix):
        if isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):
                rows += _described(describe, item, f"{key}[{i}].")
        else:
            rows.append((key, tp, value, doc))
    return rows


# an encoder's features, the same for tinymim export, tinymim knn and the Python API (tinymim.models.features)
FEATURES_HELP = ("pre-trained encoders: auto (default) stops a distilled student before its last block when "
                 "distillation did not wholly train it, else final; final: after every block and the final norm; "
                 "relation-input: the tokens entering the last block")
POOL_HELP = "an encoder's features: avg, the mean of its patch tokens (default), or token, its class token"


def cmd_export(args) -> int:
    from tinymim.evaluate import export

    if args.format == "timm":
        out = export.export_timm(args.source, args.output, args.model, args.features, overwrite=args.overwrite,
                                 pool=args.pool)
        print(f"wrote {out}: load it with timm.create_model('local-dir:{out}', pretrained=True)")
    else:
        diff = export.export_onnx(args.source, args.output, args.model, features=args.features,
                                  overwrite=args.overwrite, pool=args.pool)
        print(f"wrote {args.output}: matches PyTorch within {diff:.1e} (onnxruntime, CPU)")
    return 0


def cmd_eval(args) -> int:
    from tinymim.evaluate import robustness

    result = robustness.evaluate_path(args.source, args.data, protocol=args.protocol, weights=args.weights,
                                      batch_size=args.batch_size, num_workers=args.workers, split=args.split,
                                      limit=args.limit, progress=not args.no_progress)
    print(robustness.format_report(result))
    if args.json:
        from tinymim.core.files import write_json

        write_json(args.json, result)
    return 0


def cmd_knn(args) -> int:
    from tinymim.evaluate.robustness import knn_evaluate

    r = knn_evaluate(args.source, args.data, args.val, model_name=args.model, block=args.block, k=args.k,
                     temperature=args.temperature, mean=args.mean, std=args.std, batch_size=args.batch_size,
                     num_workers=args.workers, bank_size=args.bank_size, features=args.features, pool=args.pool)
    print(f"k-NN (k={args.k}, T={args.temperature}) top-1 {r['knn_top1']:.2f}% "
          f"({r['queries']} queries, bank of {r['bank']})")
    return 0


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N); None -> (0, 1). run_pipeline checks the range."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise TinymimError(f"--shard {text}: give I/N, e.g. 0/2 and 1/2 for two processes") from None
    return index, count


def cmd_pipeline(args) -> int:
    import json

    from tinymim.pipeline import planning, stages

    # "key=value" for every stage, "task:key=value" for one task's stages: applied last, so they win
    cfg = planning.load(args.config, [f"command_line={json.dumps(list(args.overrides))}"])
    shard = parse_shard(args.shard)
    summaries = stages.run_pipeline(cfg, args.output, shard=shard)
    reused = sum(s["reused"] for s in summaries)
    if shard[1] > 1:
        print(f"done: shard {shard[0]}/{shard[1]} ran or reused its {len(summaries)} stages ({reused} reused); "
              f"the plain command (no --shard) writes {args.output}/report.md")
    else:
        print(f"done: {len(summaries)} stages ({reused} reused); report: {args.output}/report.md")
    return 0


def cmd_demo(args) -> int:
    from tinymim.pipeline.demo import run_demo

    report = run_demo(args.output, args.data, progress=not args.no_progress)
    print(report.read_text())
    print(f"report: {report} (plots in {report.parent / 'plots'})")
    return 0


def cmd_visualize(args) -> int:
    from tinymim.evaluate.visualize import relation_grid

    out = relation_grid(args.run, args.image, args.output, args.relations, args.heads, args.queries, args.cell)
    print(f"wrote {out}")
    return 0


def cmd_corrupt(args) -> int:
    from tinymim.evaluate import corruptions

    tree = corruptions.corrupt_folder(args.source, args.output, args.corruptions, args.severities, args.per_class)
    print(f"wrote {tree.written} images under {args.output}/<corruption>/<severity>/<class>/")
    if tree.unreadable:
        print(f"warning: {tree.unreadable_summary()}", file=sys.stderr)
    if tree.problems:
        print(f"warning: {tree.summary()}", file=sys.stderr)
    return 0


def cmd_shards(args) -> int:
    from tinymim.data.shard_writer import write_shards
    from tinymim.data.sources import FolderImages

    if args.index:
        from tinymim.data.shard_index import index_webdataset

        index = index_webdataset(args.index, None if args.label == "none" else args.label, args.output)
        remote = "://" in args.index
        # a local index written to --output reads the tars where they are (the index records their folder)
        root = args.index.rpartition("/")[0] if remote else (args.output or args.index)
        print(f"indexed {len(index['shards'])} shards ({index['total']} images, {len(index['classes'])} classes) "
              f"in {args.output or args.index}/index.json; "
              + ("serve it beside the shards, then " if remote else "")
              + f"train on them with data.name=shards data.root={root}")
        return 0
    if args.source is None or args.output is None:
        raise TinymimError("tinymim shards needs SRC --output DIR (write shards), or --index DIR (index shards "
                           "another tool wrote)")
    index = write_shards(FolderImages(args.source), args.output, args.shard_size, args.seed)
    shards = index["shards"]
    print(f"wrote {len(shards)} shards ({index['total']} images, {len(index['classes'])} classes, "
          f"{sum(s['bytes'] for s in shards) / 2**20:.1f} MiB) and index.json to {args.output}; "
          f"train on them with data.name=shards data.root={args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinymim", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    # the catalog, not the task modules: --help, --version and a mistyped command need neither torch nor timm
    from tinymim.tasks import CATALOG

    for name, entry in CATALOG.items():
        p = sub.add_parser(name, help=entry.help)
        _add_run_args(p)
        p.set_defaults(func=cmd_train)
        if name == "distill":
            _add_own_images_args(p)
    p = sub.add_parser("config", help="print a task's resolved config (defaults <- recipe <- overrides): every "
                                      "key with its value, type and meaning")
    p.add_argument("task", choices=[*CATALOG, "pipeline"])
    p.add_argument("--config", help="YAML recipe or a built-in one (default: the task's defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("pipeline", help="run declared stages (MAE -> TinyMIM chain -> fine-tune ...), reusing "
                                        "finished ones, and write report.md with plots")
    p.add_argument("--config", required=True, help="pipeline YAML (or a built-in one, e.g. pipelines/demo)")
    p.add_argument("--output", required=True, help="folder of the stages' run directories and the report")
    p.add_argument("overrides", nargs="*", metavar="[task:]section.key=value",
                   help="overrides for every stage, or with a task prefix (finetune:train.epochs=5) for that task's")
    p.add_argument("--shard", metavar="I/N", help="run every N-th stage from the I-th, waiting for the other "
                   "shards' stages it builds on: N processes (e.g. OMP_NUM_THREADS=1 each) share one pipeline; "
                   "then the plain command writes the report")
    p.set_defaults(func=cmd_pipeline)
    p = sub.add_parser("demo", help="the main job in miniature, in minutes on a CPU: a shipped MAE teacher -> "
                                    "TinyMIM student, fine-tuned beside a from-scratch twin, with a report")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--data", default="cifar10",
                   help="cifar10 (default: torchvision's, downloaded once into ~/.cache/tinymim), a folder with "
                        "train/ and val/ (or test/) ImageFolders or with train.tar and test.tar, or synthetic "
                        "(offline; cannot show the effect)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("export", help="write a trained model as a timm/hub folder or as ONNX")
    p.add_argument("source", help="a run directory, or a weights file (then --model is needed)")
    p.add_argument("--format", choices=["timm", "onnx"], default="timm")
    p.add_argument("--output", required=True, help="folder (timm) or .onnx file")
    p.add_argument("--model", help="timm architecture of a bare weights file, e.g. vit_small_patch16_224")
    p.add_argument("--features", default="auto", choices=["auto", "final", "relation-input"],
                   help=FEATURES_HELP)
    p.add_argument("--pool", default="avg", choices=["avg", "token"], help=POOL_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier export in --output (default: refuse a non-empty folder "
                        "or an existing file)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("eval", help="top-1/top-5 of a fine-tuned run (plain, ImageNet-A/R subsets, corruptions), "
                                    "or mIoU of a segment run")
    p.add_argument("source", help="a tinymim finetune or segment run directory")
    p.add_argument("--data", required=True, help="ImageFolder, 200-class subset folder, or corruption tree "
                                                  "(or a tar of one)")
    p.add_argument("--protocol", default="auto", choices=["auto", "plain", "subset", "corruptions", "imagenet-c"],
                   help="imagenet-c: a corruption tree of all 15 at severities 1..5, and its mCE (AlexNet-normalized)")
    p.add_argument("--weights", default="best", choices=["best", "last"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--split", help="segmentation runs: the split under DATA/images/ (default val)")
    p.add_argument("--limit", type=int, metavar="N", help="score N images of each folder (each corruption and "
                   "severity), evenly spaced over its sorted files, so every class in proportion; the report says "
                   "'N of M images'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("knn", help="weighted k-NN accuracy of a model's frozen features")
    p.add_argument("source", help="a run directory, a shipped teacher (builtin:NAME) or weights (then --model)")
    p.add_argument("--data", required=True, help="labelled ImageFolder or a tar of one: the neighbour bank")
    p.add_argument("--val", required=True, help="labelled ImageFolder or a tar of one: the queries")
    p.add_argument("--model", help="timm architecture of a bare weights file")
    p.add_argument("--block", type=int, help="the mean patch token entering this block (1-indexed) of the whole "
                                             "model, instead of --features")
    p.add_argument("--features", default="auto", choices=["auto", "final", "relation-input"], help=FEATURES_HELP)
    p.add_argument("--pool", default="avg", choices=["avg", "token"], help=POOL_HELP)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--mean", type=float, nargs=3, help="normalization mean (default: the run's; ImageNet's for a file)")
    p.add_argument("--std", type=float, nargs=3, help="normalization std (default: the run's; ImageNet's for a file)")
    p.add_argument("--bank-size", type=int, help="use a fixed random sample of N images of the bank")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_knn)
    p = sub.add_parser("visualize", help="teacher vs student relation maps of a distill run, as a PNG grid")
    p.add_argument("run", help="a tinymim distill run directory")
    p.add_argument("--image", required=True)
    p.add_argument("--output", required=True, help="PNG file")
    p.add_argument("--relations", nargs="+", default=["qk", "vv"])
    p.add_argument("--heads", nargs="+", type=int, default=[0])
    p.add_argument("--queries", nargs="+", type=int, help="token indices (default: the center patch)")
    p.add_argument("--cell", type=int, default=128, help="pixels per panel")
    p.set_defaults(func=cmd_visualize)
    p = sub.add_parser("corrupt", help="write an ImageNet-C style corruption tree from an ImageFolder")
    p.add_argument("source", help="ImageFolder root (root/<class>/<image>), or a tar of one; unreadable images "
                                  "are skipped and named")
    p.add_argument("--output", required=True)
    p.add_argument("--corruptions", nargs="+", help="default: all available")
    p.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--per-class", type=int, help="at most this many images per class")
    p.set_defaults(func=cmd_corrupt)
    p = sub.add_parser("shards", help="write an ImageFolder as WebDataset tar shards with an index, for "
                                      "data.name=shards (local or served over http)")
    p.add_argument("source", nargs="?", help="ImageFolder root (root/<class>/<image>)")
    p.add_argument("--output", help="a new folder for shard-NNNNNN.tar and index.json")
    p.add_argument("--index", metavar="DIR|URL", help="instead: write DIR/index.json for WebDataset tars another "
                   "tool wrote (webdataset's ShardWriter, public WebDataset sets); for tars at a URL, a brace "
                   "pattern (https://host/train-{000000..000127}.tar) and --output DIR for the index; for a "
                   "folder, --output OUT writes OUT/index.json and leaves the tars where they are (read-only "
                   "storage)")
    p.add_argument("--label", default="cls", help="with --index: where a sample's class is: cls, txt, "
                                                 "json:FIELD, or none (pre-training)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (about 100 MiB of ImageNet)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order images are written in")
    p.set_defaults(func=cmd_shards)
    return parser


def one_line(message: str) -> str:
    """An error message on one line. An error raised inside a DataLoader worker arrives wrapped in the
    worker's traceback: the message starts at its last `Type: ` line (what follows it, such as the
    engine's note that the state was saved, is kept)."""
    if "Original Traceback" in message:
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        at = max((i for i, line in enumerate(lines) if re.match(r"[\w.]+: ", line)), default=len(lines) - 1)
        message = " ".join([re.sub(r"^[\w.]+: ", "", lines[at], count=1), *lines[at + 1:]])
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def main(argv=None) -> int:
    # a stop signal during start-up (the imports the parser needs, a teacher's build) stops a training
    # run, not kills it; commands that do not train get the default action back once parsed
    note_early()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        # overrides on both sides of an option (`key=value --output RUN key=value`): argparse takes one run
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from tinymim import __version__
        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.func is not cmd_train:
        release_early()
    try:
        return args.func(args)
    except TinymimError as e:
        code = getattr(e, "exit_code", 1)
        if getattr(e, "quiet", False):
            return code
        if code == 1:
            print(f"error: {one_line(str(e))}", file=sys.stderr)
        elif _is_main_process():  # a requested stop: one line, from one process
            print(one_line(str(e)), file=sys.stderr)
        return code
    except (RuntimeError, OSError, EOFError) as e:
        died = loader_worker_death(e)  # a data-loading worker's death, in any of its forms
        if died is not None:
            print(f"error: {one_line(str(died))}", file=sys.stderr)
            return 1
        if not isinstance(e, OSError):
            raise  # an internal error: its traceback is the report
        where = f" {e.filename}" if e.filename else ""  # a path the user gave that cannot be read or written
        print(f"error: cannot use{where}: {e.strerror or e}; check the path and its permissions", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept and the same command resumes", file=sys.stderr)
        return 130
    finally:
        import gc

        gc.collect()  # an exception's reference cycles may hold data loaders: their workers end now
        dist = sys.modules.get("torch.distributed")  # only a command that imported torch can have started it
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
