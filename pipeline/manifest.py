"""A bundle's manifest and what reading a bundle needs (`pipeline bundle` writes them: pipeline/bundle.py).

A bundle B mirrors a work directory's layout for prediction alone (B/config.json, B/<[fusion] output>/,
B/models/, B/tokenizers/, B/upstream/), with B/manifest.json naming every file's sha256 and size: `verify`
checks them all before anything is loaded, and `settings` points the configuration at B's own upstream
models and class names.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.provenance import read_json, sha256_file

FORMAT = 1
MANIFEST = "manifest.json"
TEXT_MODEL = "upstream/text-model"
IMAGE_WEIGHTS = "upstream/image.safetensors"
CLASS_NAMES = "class_names.csv"


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def verify(bundle: str | Path) -> dict:
    """The manifest, once every file it lists has its size and sha256 (one line naming the first that does not)."""
    bundle = Path(bundle)
    manifest = read_json(bundle / MANIFEST, "bundle manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise PipelineError(f"{bundle / MANIFEST}: not a bundle manifest of format {FORMAT}; build the bundle again "
                            f"with `pipeline bundle --workdir W --out {bundle}`")

    def problem(item) -> str | None:
        name, want = item
        path = bundle / name
        if not path.is_file() or path.stat().st_size != want.get("bytes"):
            return f"{path}: missing or of another size than the manifest says"
        return None if sha256_file(path) == want.get("sha256") else f"{path}: damaged (sha256 differs from the manifest)"

    with ThreadPoolExecutor(4) as pool:  # hashlib releases the GIL: the big files hash side by side
        problems = [p for p in pool.map(problem, sorted(manifest["files"].items())) if p]
    if problems:
        raise PipelineError(f"{problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; "
                            f"build the bundle again with `pipeline bundle --workdir W --out {bundle}`")
    return manifest


def settings(bundle: str | Path, cfg: Config) -> Config:
    """`cfg` with the upstream models and class names read from the bundle (after `verify`)."""
    bundle = Path(bundle).resolve()
    files = verify(bundle)["files"]
    over: dict = {"stores": {"root": ""}}
    if any(name.startswith(TEXT_MODEL + "/") for name in files):
        over["text_model"] = {"path": str(bundle / TEXT_MODEL)}
    if IMAGE_WEIGHTS in files:
        over["image"] = {"weights": str(bundle / IMAGE_WEIGHTS)}
    over["serve"] = {"class_names": str(bundle / CLASS_NAMES) if CLASS_NAMES in files else ""}
    return cfg.merged(over, f"(bundle {bundle})")
