"""The typed tables of a configuration: what each key means, its type and its range (no defaults here).

Every value comes from the TOML files in configs/ (`default.toml` is the root of every config), so each
hyperparameter has one home; these classes only say what a value may be. A table refuses unknown keys,
wrong types and out-of-range values; `pipeline.config` turns the refusal into one line naming the
file, the table and the key.
"""
from __future__ import annotations

import codecs
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A config table: known keys only, exact types (an int is accepted where a float is expected)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _power_of_two(v: int) -> int:
    if v & (v - 1):
        raise ValueError("expected a power of two")
    return v


Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
PowerOfTwo = Annotated[int, Field(ge=1, le=2**20), AfterValidator(_power_of_two)]  # block sizes: at most 1M rows
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]
Decay = Annotated[float, Field(gt=0, le=1)]
Device = Literal["auto", "cpu", "cuda"]
Loss = Literal["balanced", "plain"]
KernelSizes = Annotated[list[Positive], Field(min_length=1)]


# ---------------------------------------------------------------------- catalogue, split, stores
class Columns(Section):
    id: str  # "" = the CSV's unnamed index column
    title: str
    description: str
    product_id: str
    image_id: str
    label: str


class Layout(Section):
    train: str
    labels: str  # "" when the label column is in the train file
    test: str
    separator: Annotated[str, Field(min_length=1, max_length=1)]
    image_dirs: dict[str, str]
    image_name: str
    columns: Columns


def _text_encoding(v: str) -> str:
    try:
        codecs.lookup(v)
    except LookupError:
        raise ValueError("expected a text encoding Python knows (\"utf-8\", \"cp1252\", \"latin-1\", ...)") from None
    return v


class TableColumns(Section):
    id: Annotated[str, Field(min_length=1)]
    title: Annotated[str, Field(min_length=1)]
    description: str  # "" or a column the table lacks: no descriptions
    image: str  # a photo's path, relative to the table's folder (or absolute)
    label: str  # a class code or name; a row without one is an item to predict


class Table(Section):
    columns: TableColumns
    separator: Annotated[str, Field(min_length=1, max_length=1)]  # of .csv files (.tsv: a tab)


class CatalogSettings(Section):
    layout: str  # "auto", "table" or a table of [catalog.layouts]
    encoding: Annotated[str, AfterValidator(_text_encoding)]
    table: Table
    layouts: dict[str, Layout]

    @model_validator(mode="after")
    def _known_layout(self):
        if self.layout not in self.layouts and self.layout not in ("auto", "table"):
            raise ValueError(f"layout '{self.layout}' is not \"auto\", \"table\" or a table of [catalog.layouts] "
                             f"(have {sorted(self.layouts)})")
        return self


class Split(Section):
    valid_items: Positive
    reference_train_items: Positive
    seed: int


class Stores(Section):
    backend: Literal["zarr", "hdf5"]
    block_items: PowerOfTwo
    root: str
    chunk_bytes: Annotated[int, Field(ge=1024)]
    gzip_level: Annotated[int, Field(ge=0, le=9)]
    plan_wait_s: PositiveFloat


class Extract(Section):
    device: Device


class TinyModel(Section):
    vocab_size: Annotated[int, Field(ge=16)]
    hidden_size: Positive
    num_layers: Positive
    num_heads: Positive
    intermediate_size: Positive


class TextModel(Section):
    path: str
    batch_tokens: Positive
    max_batch: Positive
    prefix: str
    layers: NonNegative  # 0 = every layer; k = the hidden states of layer k (the first k layers run)
    tiny: TinyModel


class ReaderSettings(Section):
    memory_gb: Annotated[float, Field(ge=0)]
    mode: Literal["auto", "memory", "stream"]
    buffer_blocks: Positive
    prefetch_batches: Positive
    length_sort_window: NonNegative
    max_tokens: NonNegative


# ---------------------------------------------------------------------- pretraining
class TrainOptions(Section):
    """[pretrain] (defaults of every modality) and [pretrain.<modality>]: one modality's network and run.

    A modality's table is this plus the keys of its own class (its record's `train_options`)."""

    coder: Literal["trainable", "static"]
    loss: Loss
    device: Device
    eval_batch_size: Positive
    cpu_threads: NonNegative
    inner_dim: Positive
    depth: Positive
    width: Positive
    weight_decay: Annotated[float, Field(ge=0)]
    static_quantiles: Annotated[list[Probability], Field(min_length=2, max_length=2)]
    label_smoothing: Probability
    batch_size: Annotated[int, Field(ge=2)]  # the BatchNorm of a training batch needs 2 items
    epochs: Positive
    lr: PositiveFloat
    decay: Decay

    @model_validator(mode="after")
    def _static_width(self):
        if self.coder == "static" and self.width & (self.width - 1):
            raise ValueError(f"the static coder needs a power-of-two width, not {self.width}")
        if not 0 < self.static_quantiles[0] <= self.static_quantiles[1]:
            raise ValueError(f"static_quantiles must be two quantiles 0 < low <= high < 1, not {self.static_quantiles}")
        return self


class TextTrainOptions(TrainOptions):
    """The n-gram CNN over token features, shared by the text modalities (title_cam, desc_cam, title_bpe)."""

    kernel_sizes: KernelSizes
    channels: Positive
    dropout: Probability
    token_dropout: Probability  # training only: the probability of hiding each token ("word dropout")
    static_pooling: Literal["tokens", "mean"]  # static coder: sketch every token and sum, or sketch their mean


# Keys that decide how a run is executed, not what it computes: they are not part of a model's stamp.
RUN_ONLY_KEYS = ("eval_batch_size", "device", "cpu_threads")


# ---------------------------------------------------------------------- sketch, fusion, demo
class Sketch(Section):
    batch_size: Positive
    block_items: PowerOfTwo


class Predict(Section):
    batch_rows: Positive  # rows `pipeline predict` hands the predictor at once
    chunk_rows: Positive  # rows the predictor computes at once: bounds the memory of decoded photos, token states


class Head(Section):
    name: str
    inputs: Annotated[list[str], Field(min_length=1)]


# The work directory's own entries: what the stages write there (pipeline/workdir.py's paths; `evaluations/`:
# the per-model evaluations). `[fusion] output` names a folder beside them, never one of them; `--out`
# arguments never point into them.
WORKDIR_ENTRIES = ("config.json", "split.parquet", "features", "sketches", "models", "tokenizers", "upstream",
                   "export", "evaluations")


def _stage_output(name: str) -> str:
    """`[fusion] output`: a plain folder name inside W that no other stage writes."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError("expected a plain folder name inside the work directory (letters, digits, '_', '-', '.'; "
                         "no path, not hidden)")
    if name.casefold() in {e.casefold() for e in WORKDIR_ENTRIES}:
        raise ValueError(f"'{name}' is another stage's output in the work directory ({', '.join(WORKDIR_ENTRIES)}); "
                         "name a folder of its own (e.g. \"fusion\")")
    return name


class Fusion(Section):
    output: Annotated[str, AfterValidator(_stage_output)]  # a folder of its own inside the work directory
    method: Literal["joint", "average"]  # heads trained jointly, or the pretrained heads' probabilities averaged
    heads: Annotated[list[Head], Field(min_length=1)]
    lr: PositiveFloat
    decay: Decay
    epochs: Positive
    batch_size: Positive
    loss: Loss
    worst_classes: Annotated[int, Field(ge=2)]

    @model_validator(mode="after")
    def _average_reads_pretrained_heads(self):
        if self.method == "average":
            names = {}
            for head in self.heads:
                if len(head.inputs) != 1 or names.setdefault(head.name, head.inputs[0]) != head.inputs[0]:
                    raise ValueError(f"method \"average\" takes each modality's own pretrained head: every head "
                                     f"reads one modality (one name, one modality); '{head.name}' reads "
                                     f"{head.inputs}")
        return self


class Demo(Section):
    items: Annotated[int, Field(ge=100)]
    seed: int


class RealData(Section):
    catalog: str


class Serve(Section):
    """`pipeline serve`: where it listens, how it batches, what one request may hold, how it swaps models."""

    host: str
    port: Annotated[int, Field(ge=0, le=65535)]  # 0: any free port (the ready line names it)
    max_batch_items: Positive  # items of concurrent requests grouped into one Predictor call
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)]  # how long a batch waits for more items once the first is queued
    parallel_batches: Annotated[int, Field(ge=1, le=64)]  # batches predicted at once, sharing the torch threads
    max_request_items: Positive
    max_body_bytes: Positive
    top_k: Positive  # classes in each answer
    watch_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]  # model files checked for a swap this often (0: on SIGHUP only)
    drain_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)]  # SIGTERM: requests in flight get this long to finish
    class_names: str  # a CSV file of `prdtypecode,name` rows ("": answers name codes only)


# The general tables of a config (modality tables come from the registry); the optional ones are None
# where no file has them ([demo] is in demo.toml, [real_data] in rakuten-real.toml).
TABLES: dict[str, type[Section]] = {
    "catalog": CatalogSettings, "split": Split, "stores": Stores, "extract": Extract, "text_model": TextModel,
    "train_reader": ReaderSettings, "sketch": Sketch, "predict": Predict, "fusion": Fusion, "demo": Demo,
    "real_data": RealData, "serve": Serve,
}
OPTIONAL_TABLES = ("demo", "real_data")
