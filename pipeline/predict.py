"""`pipeline predict`: classify the items of a catalogue with a trained work directory.

Only what is missing is computed: the items' features go into the same feature stores (items
already there are skipped, an item whose input changed is refused), their sketches into the same
sketch stores, then the fusion heads of W/fusion/model.pt give a product type code per item,
written in the challenge's submission format (`,prdtypecode` header; item id, code).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline import checkpoint, workdir as wd
from pipeline.catalog import load_catalog, read_split, write_submission
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.extract import extract_items
from pipeline.heads import FusionHeads
from pipeline.sketch import Sketcher, sketch_into_store
from stores import FeatureStore


def predict(catalog_dir: str | Path, workdir: str | Path, out_csv: str | Path, cfg: Config, *,
            progress: bool = True, log=print) -> pl.DataFrame:
    workdir = Path(workdir)
    fusion_path = wd.fusion_dir(workdir, cfg) / checkpoint.MODEL_FILE
    if not fusion_path.exists():
        raise PipelineError(f"{fusion_path} not found: train the work directory first (extract, pretrain, "
                            f"sketch, fuse; or `pipeline demo --workdir {workdir}`)")
    fusion = checkpoint.load(fusion_path)
    catalog = load_catalog(catalog_dir, cfg, require_train=False)
    log(catalog.summary())
    split = read_split(workdir)  # read, never changed: these items are not training data
    modalities = list(fusion["dims"])
    extract_items(modalities, catalog, split, workdir, cfg, progress=progress, log=log)

    ids = catalog.items["item_id"].to_numpy()
    sketches = {}
    for m in modalities:
        sketcher = Sketcher(m, workdir, cfg)
        if sketcher.producer["checkpoint_sha256"] != fusion["checkpoints"][m]:
            raise PipelineError(f"{fusion_path} was trained on sketches of another {m} checkpoint: run "
                                f"`{wd.command(cfg, workdir, f'sketch {m}')}` and `{wd.command(cfg, workdir, 'fuse')}` again")
        path = wd.sketch_store_path(workdir, cfg, m)
        summary = sketch_into_store(sketcher, ids, path, cfg, wd.command(cfg, workdir, f"sketch {m}"), progress, log)
        log(summary.line())
        with FeatureStore(path) as store:
            sketches[m] = torch.from_numpy(store.read("sketch", ids))

    model = FusionHeads(fusion["heads"], fusion["dims"], len(fusion["codes"]), fusion.get("method", "joint"))
    model.load_state_dict(fusion["state_dict"])
    model.eval()
    with torch.inference_mode():
        classes = model(sketches).argmax(-1).numpy()
    table = pl.DataFrame({"item_id": ids, "prdtypecode": np.array(fusion["codes"])[classes]})
    write_submission(out_csv, ids, table["prdtypecode"])
    log(f"predict: {len(table)} items -> {out_csv}")
    return table
