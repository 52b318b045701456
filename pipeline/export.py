"""Export a trained work directory for serving: each modality's encoder + EMDE coder, and the fusion heads,
as `torch.export` programs (`.pt2`, run without this project's classes; `load_program` loads one safely).

    W/export/<modality>.pt2   (*inputs) -> sketch (B, depth * width); inputs as pipeline.train_reader makes them:
                              ids (B, L) int64 + mask (B, L) bool | x (B, L, H) float32 + mask | x (B, *shape) + present (B,)
    W/export/fusion.pt2       {modality: sketch} -> fused logits (B, classes)

The batch size and the sequence length are dynamic. Every system exports: trainable and static coders, the
image tail fine-tuned over a cut cache, joint and averaged fusion (the eval paths have no data-dependent
branch; tests/test_demo.py and tests/test_paper_systems.py compare each program with its network).
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from pipeline import checkpoint, modalities, workdir as wd
from pipeline.config import Config
from pipeline.heads import FusionHeads
from pipeline.provenance import write_bytes
from pipeline.trust import check_program
from stores import ArraySpec


class Sketcher(nn.Module):
    """A modality's network up to its input sketch (the head left out, as in paper 3.5)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.sketch(x, mask)


def example_inputs(modality: str, spec, batch: int = 4, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs shaped as the reader makes them for this modality's store array."""
    kind = modalities.get(modality).batch
    if kind == "ids":
        return torch.ones(batch, length, dtype=torch.long), torch.ones(batch, length, dtype=torch.bool)
    if kind == "tokens":
        return torch.zeros(batch, length, *spec.shape), torch.ones(batch, length, dtype=torch.bool)
    return torch.zeros(batch, *spec.shape), torch.ones(batch, dtype=torch.bool)


def export_sketcher(model: nn.Module, modality: str, spec) -> torch.export.ExportedProgram:
    x, mask = example_inputs(modality, spec)
    b, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1)
    dims = ({0: b}, {0: b}) if modalities.get(modality).batch == "fixed" else ({0: b, 1: length}, {0: b, 1: length})
    return torch.export.export(Sketcher(model.eval()), (x, mask), dynamic_shapes=dims)


def export_heads(heads: FusionHeads, dims: dict[str, int]) -> torch.export.ExportedProgram:
    b = torch.export.Dim("batch", min=1)
    sketches = {m: torch.zeros(3, d) for m, d in dims.items()}
    return torch.export.export(heads.eval(), (sketches,), dynamic_shapes=({m: {0: b} for m in dims},))


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """torch.export.save, atomically (a regular file or nothing replaced; see pipeline.provenance)."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    write_bytes(path, buffer.getvalue())


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """A `.pt2` program, as `torch.export.load` reads it, once the archive is checked to hold nothing that
    loading would unpickle or run (pipeline.trust: a crafted file is refused in one line, unrun)."""
    path = Path(path)
    data = path.read_bytes()  # checked and loaded from the same bytes
    check_program(data, path)
    return torch.export.load(io.BytesIO(data))


def export(workdir: str | Path, cfg: Config, out: str | Path | None = None, log=print) -> dict[str, Path]:
    """Every network of W's fusion into `out` (default W/export/); returns name -> file."""
    workdir = Path(workdir)
    if out:
        wd.check_output_path(out, workdir, cfg, f"--out {out}", allow=("export",))
    out = Path(out) if out else workdir / "export"
    fusion = checkpoint.load(wd.fusion_dir(workdir, cfg) / checkpoint.MODEL_FILE)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for m in fusion["dims"]:
        model, ckpt = checkpoint.load_model(wd.model_dir(workdir, m))
        spec_json = ckpt["store"]["provenance"]["layout"]["arrays"][modalities.get(m).array]
        files[m] = out / f"{m}.pt2"
        save_program(export_sketcher(model, m, ArraySpec.from_json(spec_json)), files[m])
        log(f"export: {m} -> {files[m]}")
    heads = FusionHeads(fusion["heads"], fusion["dims"], len(fusion["codes"]), fusion.get("method", "joint"))
    heads.load_state_dict(fusion["state_dict"])
    files["fusion"] = out / "fusion.pt2"
    save_program(export_heads(heads, fusion["dims"]), files["fusion"])
    log(f"export: fusion -> {files['fusion']}")
    return files
