"""What a catalogue's predictions are written as: the challenge's submission file and a table of probabilities."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.provenance import atomic_path


def write_submission(path: str | Path, ids, codes) -> None:
    """Predictions in the challenge's submission format: a `,prdtypecode` header, then `item_id,code` rows."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(",prdtypecode\n")  # polars would quote the empty index name
        pl.DataFrame({"item_id": np.asarray(ids, np.int64), "code": np.asarray(codes, np.int64)}) \
            .write_csv(fh, include_header=False)


def probabilities_table(ids, probs: np.ndarray, codes: list[int], names: dict[int, str] | None = None) -> pl.DataFrame:
    """Predictions with their probabilities: item_id, prdtypecode (the most probable code), probability (of
    that code), `label` (its class name, when the catalogue names its classes: `names`, code -> name), and
    p_<code> for every class (probs: (items, classes), column j for codes[j])."""
    probs = np.asarray(probs, np.float32)
    best = np.asarray(codes, np.int64)[probs.argmax(-1)] if len(codes) else np.zeros(len(probs), np.int64)
    named = {"label": [names.get(int(c)) for c in best]} if names else {}
    return pl.DataFrame({"item_id": np.asarray(ids, np.int64), "prdtypecode": best, "probability": probs.max(-1)}
                        | named | {f"p_{c}": probs[:, i] for i, c in enumerate(codes)})
