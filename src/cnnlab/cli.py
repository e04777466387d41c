"""The ``cnnlab`` command: parse, call the library, print. No logic lives only here."""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from cnnlab.errors import CnnlabError, TrainingInterrupted

EXIT_BAD_INPUT = 2
HELP = {"recipe": "start from a named recipe (see `cnnlab recipes`)",
        "data": "cifar10, cifar100, mnist, fashion-mnist, or a folder with train/<class>/<image> and test/...",
        "device": "auto picks cuda when available, else cpu"}


# ----------------------------------------------------------------------------- helpers
def _config_flags(parser: argparse.ArgumentParser, *, only: Sequence[str] | None = None) -> None:
    """One ``--flag`` per Config field, so every key can be set from the command line."""
    from cnnlab.config import FIELDS, _HINTS
    group = parser.add_argument_group("config keys (override --recipe and --config)")
    for name in FIELDS:
        if only is not None and name not in only:
            continue
        hint = _HINTS[name]
        choices = None
        for arg in typing.get_args(hint) or (hint,):
            if typing.get_origin(arg) is typing.Literal:
                choices = typing.get_args(arg)
        if typing.get_origin(hint) is typing.Literal:
            choices = typing.get_args(hint)
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "default": None}
        if hint is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif choices:
            kwargs.update(choices=choices)
        else:
            kwargs.update(metavar=name.upper())
        default = FIELDS[name].default
        kwargs["help"] = HELP.get(name, f"default: {default}")
        group.add_argument(flag, **kwargs)


def _overrides(args: argparse.Namespace, names) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from cnnlab.config import FIELDS, resolve
    from cnnlab.train.loop import fit, resume
    overrides = _overrides(args, FIELDS)
    if args.resume:
        allow = {k: v for k, v in overrides.items() if k == "epochs"}
        refused = sorted(set(overrides) - set(allow))
        if refused or args.config:
            raise CnnlabError(f"--resume continues a run with its saved config; it only accepts "
                              f"--epochs to extend it, not {', '.join(refused) or '--config'}")
        resume(args.resume, allow=allow)
        return 0
    cfg = resolve(config_file=args.config, overrides=overrides)
    fit(cfg, out=args.out, name=args.name)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnlab.evaluate import evaluate_run
    result = evaluate_run(args.run, data=args.data, data_dir=args.data_dir, device=args.device)
    if args.json:
        _print_json(result)
    else:
        print(f"{result['run']}: test accuracy {result['test_accuracy']:.4f}, test loss "
              f"{result['test_loss']:.4f} on {result['test_images']:,} images of {result['data']}")
        width = max(len(c) for c in result["per_class_accuracy"])
        for name, acc in result["per_class_accuracy"].items():
            print(f"  {name:<{width}}  {'-' if acc is None else f'{acc:.4f}'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnlab.run import load_run
    run = load_run(args.run)
    results = run.predict([Path(p) for p in args.images], top_k=args.top_k)
    if args.json:
        _print_json(results)
    else:
        for r in results:
            best = r["top"]
            print(f"{r['file']}: " + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in best))
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from cnnlab.data.show import write_sample_grid
    out = write_sample_grid(args.spec, args.out, data_dir=args.data_dir, per_class=args.per_class,
                            seed=args.seed)
    print(f"wrote {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cnnlab.models.summary import zoo_table
    rows = zoo_table(input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes)
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'name':<10} {'family':<14} {'year':>4} {'parameters':>12} {'MFLOPs':>9}  paper "
          f"(MFLOPs per {args.input_size}x{args.input_size}x{args.in_channels} image, 2 x multiply-adds)")
    for r in rows:
        params = "-" if r["parameters"] is None else f"{r['parameters']:,}"
        flops = "-" if r["mflops"] is None else f"{r['mflops']:,.1f}"
        print(f"{r['name']:<10} {r['family'][:14]:<14} {r['year']:>4} {params:>12} {flops:>9}  {r['paper']}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from cnnlab.models.registry import create_model
    from cnnlab.models.summary import format_summary
    model = create_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels,
                         input_size=args.input_size)
    print(format_summary(model, args.model, (args.in_channels, args.input_size, args.input_size)))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from cnnlab.config import list_recipes, recipe_document
    docs = {name: recipe_document(name) for name in list_recipes()}
    if args.json:
        _print_json(docs)
        return 0
    for name, doc in docs.items():
        m = doc.get("measured") or {}
        measured = (f"{m['test_accuracy']:.1%} in {m['wall_seconds']:.0f} s (median of {m.get('seeds', '?')} seeds)"
                    if m else "not yet measured")
        print(f"{name:<10} {doc.get('model', ''):<10} {doc.get('epochs', ''):>5} epochs  {measured}")
        if doc.get("description"):
            print(f"           {doc['description']}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnnlab", description="Train, compare, tune, understand and ship "
                                "convolutional image classifiers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model; leaves a run folder with model, history, plots, report")
    t.add_argument("--config", default=None, metavar="FILE", help="YAML (or a run's config.json); flags override it")
    t.add_argument("--out", default=None, metavar="PATH", help="the run folder")
    t.add_argument("--name", default=None, help="run name, under runs/")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue RUN from its last checkpoint")
    _config_flags(t, only=None)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a run on its test split (or another dataset's)")
    e.add_argument("run")
    e.add_argument("--data", default=None, metavar="SPEC")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="classify image files with a trained run")
    pr.add_argument("run")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)

    d = sub.add_parser("data", help="look at datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    ds = dsub.add_parser("show", help="save a labelled grid of sample images")
    ds.add_argument("spec", metavar="SPEC")
    ds.add_argument("--out", default="samples.png")
    ds.add_argument("--data-dir", default=None)
    ds.add_argument("--per-class", type=int, default=8)
    ds.add_argument("--seed", type=int, default=0)
    ds.set_defaults(func=cmd_data_show)

    m = sub.add_parser("models", help="list the model zoo: parameters, MFLOPs, paper")
    m.add_argument("--input-size", type=int, default=32)
    m.add_argument("--in-channels", type=int, default=3)
    m.add_argument("--num-classes", type=int, default=10)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser("summary", help="per-layer table of a model, like Keras's model.summary()")
    s.add_argument("model")
    s.add_argument("--input-size", type=int, default=32)
    s.add_argument("--in-channels", type=int, default=3)
    s.add_argument("--num-classes", type=int, default=10)
    s.set_defaults(func=cmd_summary)

    r = sub.add_parser("recipes", help="list the training recipes and what each measured here")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_recipes)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CnnlabError as e:
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingInterrupted as e:
        print(f"cnnlab: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cnnlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
