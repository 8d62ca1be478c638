"""The `zoo` command. A thin layer over the Python API; model-building commands import TensorFlow lazily.

Exit codes: 0 ok, 1 bad input or a failed check (one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from zoo import __version__
from zoo.errors import ZooError
from zoo.features import POOLINGS
from zoo.finetune.config import add_arguments as add_finetune_arguments
from zoo.weights import check_output_location


def _print_json(obj):
    print(json.dumps(obj, indent=2, default=str))


def _warn_plugin_failures():
    from zoo.plugins import loaded_plugins

    for info in loaded_plugins().failures if loaded_plugins() else ():
        print(f"zoo: warning: plugin {info.name!r} ({info.package} {info.version}) not loaded: {info.error}", file=sys.stderr)


# --- list / info ------------------------------------------------------------------------------------


def _input_summary(spec) -> str:
    i = spec.input
    h, w = i["size"]
    lo, hi = i["value_range"]
    return f"{h}x{w} {i['channel_order']} in [{lo}, {hi}], minus mean {i['mean']}, divided by std {i['std']}"


def cmd_list(args):
    from zoo.registry import families

    fams = families()
    if args.json:
        _print_json({f: [{"id": s.id, "default": s.default, "num_params": s.num_params, "fingerprint": s.fingerprint,
                          "description": s.description, "origin": s.origin} for s in versions]
                     for f, versions in sorted(fams.items())})
        return 0
    for family, versions in sorted(fams.items()):
        print(family)
        for s in versions:
            h, w = s.input["size"]
            tag = " (default)" if s.default else ""
            print(f"  {s.id + tag:<28} {s.num_params:>12,} params  {h}x{w} {s.input['channel_order']}  fingerprint {s.fingerprint}")
    return 0


def spec_info(spec) -> dict:
    return {
        "id": spec.id,
        "family": spec.family,
        "version": spec.version,
        "default": spec.default,
        "description": spec.description,
        "fingerprint": spec.fingerprint,
        "num_params": spec.num_params,
        "num_classes": spec.num_classes,
        "head": spec.head,
        "input": spec.input,
        "layers": [{"name": i.name, "kind": i.kind, "inputs": list(i.inputs), "config": i.config, "output_shape": list(i.output_shape),
                    "params": i.num_params,
                    "tensors": [{"name": t.name, "shape": list(t.shape), "layout": t.layout, "dtype": t.dtype} for t in i.tensors]}
                   for i in spec.nodes],
        "provenance": spec.provenance,
        "origin": spec.origin,
    }


def cmd_info(args):
    from zoo.registry import get_spec

    spec = get_spec(args.name)
    if args.json:
        _print_json(spec_info(spec))
        return 0
    print(f"{spec.id}{' (default version of ' + spec.family + ')' if spec.default else ''}")
    print(f"  {spec.description}")
    print(f"  input        {_input_summary(spec)}; resize {spec.input.get('resize')} then center crop")
    print(f"  parameters   {spec.num_params:,}    classes {spec.num_classes} (head: {spec.head})    fingerprint {spec.fingerprint}")
    print()
    width = max(len(n.name) for n in spec.nodes)
    print(f"  {'layer':<{width}} {'kind':<16} {'output':<14} {'params':>11}  config")
    previous = "input"
    for n in spec.nodes:
        cfg = " ".join(f"{k}={v}" for k, v in n.config.items()) + ("" if n.inputs == (previous,) else f"  <- {', '.join(n.inputs)}")
        print(f"  {n.name:<{width}} {n.kind:<16} {'x'.join(map(str, n.output_shape)):<14} {n.num_params:>11,}  {cfg}")
        previous = n.name
    prov = spec.provenance
    print()
    for key in ("paper", "origin", "license"):
        if key in prov:
            print(f"  {key:<12} {prov[key]}")
    for fname, hashes in prov.get("reference_files", {}).items():
        print(f"  {'file':<12} {fname} " + " ".join(f"{k}={v}" for k, v in hashes.items()))
    for dataset, m in prov.get("metrics", {}).items():
        print(f"  {'accuracy':<12} {dataset}: " + ", ".join(f"{k} {v}" for k, v in m.items()))
    return 0


# --- convert / verify / plugins ---------------------------------------------------------------------


def cmd_convert(args):
    from zoo.forked import run_forked

    source, path = args.args if len(args.args) == 2 else (None, args.args[0])
    options = dict(args.source_options)
    if args.map:
        try:
            options["map"] = json.loads(Path(args.map).read_text())
        except (OSError, ValueError) as e:
            raise ZooError(f"cannot read the layer mapping ({e})", args.map) from None
    kwargs = {"source": source, "spec": args.spec, "options": options, "sha256": args.sha256 or None}
    if args.store and args.output:
        raise ZooError("give -o or --store, not both")
    if args.store:
        from zoo import store

        result = run_forked(lambda: _stored(path, kwargs), path, store.incoming())
    else:
        from zoo.conversion import convert, default_output

        output = Path(args.output) if args.output else default_output(Path(path))
        result = run_forked(lambda: convert(path, output=output, **kwargs).to_dict(), path, output.parent)
    if args.json:
        _print_json(result)
        return 0
    for note in result["notes"]:
        print(f"note: {note}")
    sha256 = result["source_sha256"]
    print(f"wrote {result['output']}: {result['spec']} (fingerprint {result['fingerprint']}), {result['num_params']:,} "
          f"parameters, verified; source {result['source']}" + (f" sha256 {sha256[:16]}..." if sha256 else ""))
    return 0


def _stored(path, kwargs) -> dict:
    from zoo import store

    result, entry = store.add(path, **kwargs)
    result.notes.append(f"stored as {entry.name}")
    return result.to_dict()


def cmd_verify(args):
    from zoo.registry import load_weights

    file = _weights_file(args.file)
    w = load_weights(file)
    report = {"file": str(file), "ok": True, "spec": w.spec.id, "fingerprint": w.spec.fingerprint,
              "num_classes": w.spec.num_classes, "num_params": w.spec.num_params, "metadata": w.metadata}
    if args.json:
        _print_json(report)
    else:
        print(f"ok: {file} holds every tensor of {w.spec.id} ({w.spec.num_classes} classes, fingerprint "
              f"{w.spec.fingerprint}) with the right shapes and dtypes, all finite; {_origin(w)}")
    return 0


def _origin(w) -> str:
    """Where a weights file came from, as its metadata says: a conversion's source, or a fine-tune."""
    meta = w.metadata
    if "source_format" in meta:
        return f"source {meta['source_format']}" + (f" sha256 {meta['source_sha256'][:16]}" if "source_sha256" in meta else "")
    if w.classes:
        shown = ", ".join(w.classes[:5]) + (", ..." if len(w.classes) > 5 else "")
        base = f" from {meta['base_spec']}" if "base_spec" in meta else ""
        best = f" (epoch {meta['epoch']}, validation accuracy {float(meta['val_accuracy']):.3f})" if "val_accuracy" in meta else ""
        return f"fine-tuned{base} for {shown}{best}"
    return "no record of its origin in its metadata"


def cmd_plugins(args):
    from zoo.conversion import weight_sources
    from zoo.plugins import get_plugins
    from zoo.registry import all_specs

    sources = weight_sources()
    specs = all_specs()
    rows = []
    for info in get_plugins().infos:
        rows.append({"name": info.name, "package": info.package, "version": info.version, "module": info.module,
                     "builtin": info.builtin, "hooks": info.hooks, "error": info.error,
                     "weight_sources": [n for n, (i, _) in sources.items() if i is info],
                     "specs": [s for s, spec in specs.items() if spec.origin == info.name]})
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        what = ", ".join([f"source {s}" for s in r["weight_sources"]] + [f"spec {s}" for s in r["specs"]]) or "-"
        status = f"FAILED: {r['error']}" if r["error"] else what
        print(f"{r['name']:<12} {r['package'] + ' ' + r['version']:<26} {'built-in' if r['builtin'] else 'external':<9} {status}")
    return 0


def cmd_finetune(args):
    from zoo.finetune import finetune
    from zoo.finetune.config import given
    from zoo.report import write_report

    try:
        result = finetune(**({"weights": "stored"} | given(args)))  # the Python API's None stays random initialisation
    except KeyboardInterrupt:
        if not (Path(args.out) / "checkpoints" / "state.json").is_file():
            raise  # no epoch finished: nothing to continue
        print(f"zoo: interrupted; {args.out} keeps its last complete epoch: `zoo finetune ... --out {args.out} --resume` "
              f"continues it, `zoo report {args.out}` draws its report", file=sys.stderr)
        return 130
    if not result.chief:  # another worker of a multi-worker run: the chief writes the report and exports
        return 0
    report = write_report(result.run_dir)  # before any export: a failed export keeps the report
    if not args.json:
        print(f"report {report}")
    if args.export:
        from zoo.export import export

        for path in export(result.run_dir, formats=[f.strip() for f in args.export.split(",") if f.strip()], out=result.run_dir / "exported"):
            print(f"exported {path} (checked against the Keras model)")
    if args.json:
        _print_json({"run_dir": str(result.run_dir), "weights": str(result.weights), "classes": result.classes,
                     "trained_layers": result.trained_layers, "cached_features": result.cached_features,
                     "best_val_accuracy": result.best_val_accuracy, "history": result.history, "report": str(report)})
    return 0


def cmd_launch(args):
    from zoo.finetune.launch import launch

    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    return launch(args.workers, command)


def _weights_file(name: str, spec_names: bool = True):
    """A stored weights name (zoo weights) as its file; an existing file or folder as it is. A spec's name
    (`alexnet`, `alexnet@bvlc`) is its preferred stored file, or with `spec_names=False` left as it is (zoo bench's
    seeded architecture): then only a stored file's full name (`alexnet@bvlc/bvlc_alexnet`) is looked up."""
    from zoo import store

    if not spec_names and "/" not in name:
        return name
    return store.resolve(name, None) or name


def cmd_export(args):
    from zoo.export import export

    # TensorFlow's oneDNN allocator keeps what it frees: the Keras model let go before a format's reload check
    # stayed resident under the reloaded one (VGG16 savedmodel +537 MB, measured). A check runs a few images:
    # Eigen's kernels will do. Set before TensorFlow is imported (ONNX is written first, without it).
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    top = args.include_top == "true"
    if args.out:
        check_output_location(args.out, folder=True)
    if args.calibration and not Path(args.calibration).is_dir():
        raise ZooError("no such folder of calibration images", args.calibration)
    try:
        written = export(_weights_file(args.source), formats=formats, out=args.out, opset=args.opset, include_top=top,
                         pooling=args.pooling, calibration=args.calibration)
    except OSError as e:
        if e.filename is not None:
            raise
        # the converters' writers (onnx.save, TensorFlow) name no file: what fails there is writing the export
        raise ZooError(f"cannot write the export: {e.strerror or e}", args.out or Path(args.source).parent / "exported") from None
    if args.json:
        _print_json({"exported": [str(p) for p in written]})
    for path in written if not args.json else ():
        if "-int8" in path.name:  # its agreement was reported on stderr and is in its metadata
            print(f"exported {path}: int8, top-1 agreement with the float model measured on the calibration images")
        else:
            print(f"exported {path}: checked against the Keras model on a seeded batch (outputs within 1e-4 of their scale"
                  f"{', same top-5' if top else ''})")
    return 0


def cmd_predict(args):
    from zoo.predict import predict

    results = predict(_weights_file(args.model), args.images, top=args.top)
    for r in results:
        if r.error:
            print(f"zoo: error: {r.file}: {r.error} (skipped)", file=sys.stderr)
        elif not args.json:
            print(f"{r.file}: " + ", ".join(f"{name} {p:.3f}" for name, p in r.top))
    if args.json:
        _print_json([r.__dict__ for r in results])
    return 1 if any(r.error for r in results) or not results else 0


def cmd_features(args):
    from zoo import store
    from zoo.features import extract, outputs, write

    for path in outputs(args.output):  # a wrong name or place is refused before the work
        check_output_location(path)
    # as zoo finetune: the spec's stored weights by default, named; none stored is one line, before TensorFlow starts
    weights = store.take(args.weights or store.STORED, args.model, "features of")
    feats, paths = extract(args.model, args.images, layer=args.layer, weights=weights, batch_size=args.batch_size,
                           pooling=args.pooling, input_size=args.input_size)
    npy, txt = write(args.output, feats, paths)
    if weights is None:  # --weights random; said of what was written: a failure stays one line
        print("zoo: note: --weights random: features of randomly initialised layers, not pretrained weights", file=sys.stderr)
    if args.json:
        _print_json({"features": str(npy), "paths": str(txt), "shape": list(feats.shape)})
    else:
        print(f"wrote {npy}: {' x '.join(map(str, feats.shape))} features, one row per image; {txt}: the images in row order")
    return 0


def _size(text: str) -> tuple[int, int]:
    """"160x192" -> (160, 192)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, such as 160x192, not {text!r}") from None
    return (h, w)


def cmd_report(args):
    from zoo.report import write_report

    page = write_report(args.run)
    if args.json:
        _print_json({"report": str(page)} | json.loads(page.with_name("report.json").read_text()))
    else:
        print(f"report {page}")
    return 0


def cmd_bench(args):
    from zoo.bench import bench

    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise ZooError(f"--batch takes whole numbers, comma-separated, not {args.batch!r}") from None
    result = bench(str(_weights_file(args.model, spec_names=False)), batches=batches,
                   runtimes=[r.strip() for r in args.runtimes.split(",")] if args.runtimes else None, seconds=args.seconds)
    if args.json:
        _print_json(result)
        return 0
    limit = result["rows"][0]["limit_images_per_second"] if result["rows"] else 0
    print(f"{result['model']}: {result['gmacs_per_image']:.2f} GMAC an image; peak {result['peak_gflops']:.0f} GFLOP/s "
          f"({result['peak_how']}): at most {limit:.1f} images/s")
    print(f"{'runtime':<11} {'batch':>5} {'images/s':>9} {'p10-p90':>13} {'latency ms':>10} {'of limit':>8} {'peak MB':>8}")
    for r in result["rows"]:
        low, high = r["spread"]
        print(f"{r['runtime']:<11} {r['batch']:>5} {r['images_per_second']:>9.1f} {f'{low:.1f}-{high:.1f}':>13} {r['latency_ms']:>10.1f} "
              f"{r['images_per_second'] / r['limit_images_per_second']:>8.0%} {r['peak_memory_mb']:>8.0f}")
    return 0


def cmd_fetch(args):
    from zoo.fetch import fetch

    done = fetch(args.model, file=args.file, mirror=args.mirror)
    if args.json:
        _print_json({"url": done.url, "hash_check": done.hash_check, "downloaded": done.downloaded} | done.entry.to_dict())
    elif done.downloaded:
        print(f"stored {done.entry.name} ({done.entry.path}): downloaded from {done.url}, {done.hash_check}; converted and verified")
    else:
        print(f"{done.entry.name} is stored already ({done.entry.path})")
    return 0


def cmd_weights(args):
    from zoo import store

    if args.action != "list" and not args.name:
        raise ZooError(f"zoo weights {args.action} needs a NAME (zoo weights lists them)")
    if args.action == "rm":
        entry = store.remove(args.name)
        if args.json:
            _print_json(entry.metadata | {"removed": entry.name})
        else:
            print(f"removed {entry.name} ({entry.path})")
        return 0
    if args.action == "show":
        from zoo.registry import load_weights

        entry = store.one(args.name)
        load_weights(entry.path)  # show says verified only after checking every tensor
        if args.json:
            _print_json(entry.to_dict() | {"metadata": entry.metadata, "verified": True})
        else:
            print("\n".join(f"{k:<14} {v}" for k, v in entry.to_dict().items()) + "\nverified: every tensor checked against the spec")
        return 0
    found = store.entries()
    if args.json:
        _print_json({"home": str(store.home()), "weights": [e.to_dict() for e in found]})
        return 0
    print(f"{store.home()}: {len(found)} stored weights file(s)")
    for e in found:
        print(f"  {e.name:<48} {e.path.stat().st_size / 2**20:>8.1f} MiB  fingerprint {e.metadata.get('fingerprint')}  "
              f"from {e.metadata.get('source_file')}" + ("" if e.current else "  (STALE: the registered spec has another fingerprint)"))
    return 0


def _spec_names(**_) -> list[str]:
    """Shell completion of a model argument: every family and family@version."""
    from zoo.registry import families

    return sorted({*families(), *(s.id for versions in families().values() for s in versions)})


def _sources_and_files(prefix, **kwargs) -> list[str]:
    """Shell completion of convert's [SOURCE] FILE: the weight sources' names, then files."""
    from argcomplete.completers import FilesCompleter

    from zoo.conversion import weight_sources

    return [n for n in weight_sources() if n.startswith(prefix)] + list(FilesCompleter()(prefix, **kwargs))


def versions() -> list[str]:
    """zoo's version, the libraries' that decide its numerics, and each external plugin's (no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    from zoo.plugins import get_plugins

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    lines = [f"zoo {__version__}", f"python {sys.version.split()[0]}"]
    lines += [f"{name} {installed(dist)}" for name, dist in (("tensorflow", "tensorflow-cpu"), ("keras", "keras"), ("onnx", "onnx"),
              ("onnxruntime", "onnxruntime"), ("numpy", "numpy"), ("safetensors", "safetensors"))]
    if lines[2].endswith("not installed"):
        lines[2] = f"tensorflow {installed('tensorflow')}"
    return lines + [f"plugin {i.name}: {i.package} {i.version}" + (f" (not loaded: {i.error})" if i.error else "")
                    for i in get_plugins().infos if not i.builtin]


class _Versions(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print("\n".join(versions()))
        parser.exit()


def cmd_completion(args):
    import argcomplete

    print(argcomplete.shellcode(["zoo"], shell=args.shell))
    return 0


def _command(sub, name: str, func, help: str, example: str, json_output: bool = True, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, epilog=f"example: {example}", **kwargs)
    p.set_defaults(func=func)
    # also after the command, where users add it to the line that failed; SUPPRESS keeps a --debug given before
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    if json_output:
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="Versioned model specs, verified weights, fine-tuning and checked exports.",
                                     epilog="example: zoo convert caffe bvlc_alexnet.npy && zoo finetune alexnet --head 2 "
                                            "--weights bvlc_alexnet.safetensors --data photos/")
    parser.add_argument("--version", action=_Versions, nargs=0, help="zoo's, its libraries' and its plugins' versions")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _command(sub, "list", cmd_list, "model families and their versions", "zoo list --json")

    p = _command(sub, "info", cmd_info, "layers, parameters, preprocessing and provenance of a model spec", "zoo info resnet50@torchvision")
    p.add_argument("name", help="family (its default version) or family@version").completer = _spec_names

    p = _command(sub, "convert", cmd_convert, "convert foreign weights into verified safetensors",
                 "zoo convert caffe bvlc_alexnet.npy   (or, the source recognised: zoo convert resnet50-0676ba61.pth)",
                 usage="zoo convert [SOURCE] FILE [-o OUT | --store] [--spec NAME@VERSION] [--map MAP.json] [--sha256] [--json]")
    p.add_argument("args", nargs="+", metavar="[SOURCE] FILE",
                   help="weight source (see `zoo plugins`; recognised from the file when left out) and the file").completer = _sources_and_files
    p.add_argument("-o", "--output", help="output path (default: FILE's stem + .safetensors)")
    p.add_argument("--spec", help="the spec the weights are for (default: the one whose tensors match)").completer = _spec_names
    p.add_argument("--map", help="JSON file mapping the file's layer names to the spec's")
    p.add_argument("--sha256", action="store_true", help="record the source's sha256 (done anyway with --store, and when its "
                   "name can be checked: torch hub's hash prefix, a published file's name)")
    p.add_argument("--store", action="store_true", help="keep the result in the weights store (zoo weights), not beside FILE")

    p = _command(sub, "verify", cmd_verify, "re-check a weights file against its spec", "zoo verify bvlc_alexnet.safetensors")
    p.add_argument("file", help="verified .safetensors, or stored weights' name (zoo weights)")

    p = _command(sub, "finetune", cmd_finetune, "fine-tune a model on an image folder or list files",
                 "zoo finetune alexnet --head 2 --weights bvlc_alexnet.safetensors --data photos/ --train fc7,fc8")
    add_finetune_arguments(p)  # one per fine-tune option, from zoo.finetune.config
    next(a for a in p._actions if a.dest == "model").completer = _spec_names
    p.add_argument("--export", metavar="FORMATS", help="formats to export at the end, as zoo export --format takes them: savedmodel,onnx,...")

    p = _command(sub, "launch", cmd_launch, "run N local workers of a multi-worker fine-tune (TF_CONFIG on loopback ports)",
                 "zoo launch 2 -- finetune narrow --data photos/ --batch-size 64   (--strategy multiworker is added)", json_output=False)
    p.add_argument("workers", type=int)
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- finetune ...")

    p = _command(sub, "export", cmd_export, "export a run or weights file (SavedModel, ONNX, .keras, LiteRT, int8), each checked against Keras",
                 "zoo export runs/finetune --format savedmodel,onnx")
    p.add_argument("source", help="run folder, verified .safetensors or stored weights' name (zoo weights)")
    p.add_argument("--format", default="savedmodel,onnx",
                   help="comma-separated: savedmodel, onnx, keras, tflite, tflite-int8, onnx-int8 (default savedmodel,onnx)")
    p.add_argument("--calibration", metavar="DIR", help="images for the int8 formats (default: the run's training images)")
    p.add_argument("--out", help="output folder (default: exported/ beside the source)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--include-top", choices=("true", "false"), default="true",
                   help="false: the headless trunk, its output map (ONNX: of any input size where the layers allow it)")
    p.add_argument("--pooling", choices=POOLINGS, help="global pooling of the headless trunk's map (with --include-top false)")

    p = _command(sub, "predict", cmd_predict, "top-k classes of images from an ONNX file, a SavedModel or weights",
                 "zoo predict runs/finetune/exported/model.onnx photo.jpg photos/ --top 3")
    p.add_argument("model", help="model.onnx, model.tflite, model.keras, a SavedModel folder, a .safetensors file, stored weights' name or a run folder")
    p.add_argument("images", nargs="+", help="image files or folders (searched with their sub-folders)")
    p.add_argument("--top", type=int, default=5)

    p = _command(sub, "features", cmd_features, "a layer's output for images, with the model's preprocessing (OUT.npy, OUT.txt)",
                 "zoo features resnet50@keras --weights resnet50.safetensors --layer avg_pool photos/ -o feats.npy")
    p.add_argument("model", help="family or family@version").completer = _spec_names
    p.add_argument("images", nargs="+", help="image files or folders (searched with their sub-folders)")
    p.add_argument("-o", "--output", required=True, help="features file, .npy; the image paths go beside it as .txt, in row order")
    p.add_argument("--layer", help="the layer (or a module's dotted prefix, `layer3`) whose output to write (default: the trunk's)")
    p.add_argument("--weights", help="verified .safetensors, stored weights' name (zoo weights) or `random` "
                   "(default: the spec's stored weights, as zoo finetune)")
    p.add_argument("--pooling", choices=POOLINGS, help="global pooling of a spatial output: one value per channel")
    p.add_argument("--input-size", type=_size, metavar="HxW", help="input size, where the layers allow it (default: the spec's)")
    p.add_argument("--batch-size", type=int, default=32)

    p = _command(sub, "report", cmd_report, "a run's curves, confusion matrix and most confidently wrong images (RUN/report/)",
                 "zoo report runs/finetune")
    p.add_argument("run", help="run folder, finished or interrupted")

    p = _command(sub, "bench", cmd_bench, "forward speed in each runtime (Keras, SavedModel, ONNX Runtime) against the CPU's arithmetic limit",
                 "zoo bench runs/finetune --batch 1,32   (or a spec: zoo bench resnet50@torchvision --runtimes onnx)")
    p.add_argument("model", help="a spec (seeded weights), weights file, stored weights' full name (family@version/file, "
                   "as zoo weights lists it), run folder, export folder, model.onnx or SavedModel").completer = _spec_names
    p.add_argument("--batch", default="1,32", help="batch sizes, comma-separated (default 1,32)")
    p.add_argument("--runtimes", help="comma-separated: keras, savedmodel, onnx (default: every one the model can run in)")
    p.add_argument("--seconds", type=float, default=3.0, help="least timed seconds per measurement (default 3)")

    p = _command(sub, "fetch", cmd_fetch, "download a spec's published weights, check their hash, convert them into the store",
                 "zoo fetch resnet50@torchvision --file resnet50-11ad3fa6.pth   (then: zoo finetune resnet50@torchvision ...)")
    p.add_argument("model", metavar="SPEC[@VERSION]", help="family (its default version) or family@version").completer = _spec_names
    p.add_argument("--file", help="which published file (zoo info lists them; default: the first with a URL)")
    p.add_argument("--mirror", help="base URL serving the files by name, BASE/FILE, instead of the publisher's (default: $ZOO_MIRROR)")

    p = _command(sub, "weights", cmd_weights, "the weights store: list, show NAME (verified), rm NAME",
                 "zoo weights show resnet50@torchvision/resnet50-0676ba61")
    p.add_argument("action", nargs="?", choices=("list", "show", "rm"), default="list")
    p.add_argument("name", nargs="?", help="family@version/file-stem as listed, or family@version when it has one file")

    _command(sub, "plugins", cmd_plugins, "loaded plugins, their package, version and what they provide", "zoo plugins")

    p = _command(sub, "completion", cmd_completion, "print the shell completion script (commands, options, model names)",
                 'eval "$(zoo completion bash)"   (zsh: the same; fish: zoo completion fish | source)', json_output=False)
    p.add_argument("shell", choices=["bash", "zsh", "fish"])
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (zoo completion SHELL installs the hook)
        import argcomplete

        argcomplete.autocomplete(parser)
    # `zoo convert` passes options it does not know (--prototxt FILE) to the weight source, which declares them
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "convert":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "convert":
        if len(args.args) > 2:
            parser.error("convert takes [SOURCE] FILE")
        if len(extra) % 2 or not all(k.startswith("--") for k in extra[::2]):
            parser.error(f"source options come as --name value pairs, not {' '.join(extra)}")
        args.source_options = [(k[2:].replace("-", "_"), v) for k, v in zip(extra[::2], extra[1::2])]
    try:
        return args.func(args)
    except ZooError as e:
        if args.debug:
            raise
        print(f"zoo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zoo ... | head`: the reader left; say nothing more to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename is not None:  # the system refused a named file (full disk, ...): the user's to fix
            print(f"zoo: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
            return 1
        from zoo.safe_pickle import one_line

        message = one_line(str(e).strip().partition("\n")[0], 300)  # a TensorFlow error can go on to print whole tensors
        print(f"zoo: unexpected {type(e).__name__}: {message} (a bug; run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        _warn_plugin_failures()  # after the command: a hook can fail while it runs


if __name__ == "__main__":
    sys.exit(main())
