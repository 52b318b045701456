"""Values derived from files are remembered (provenance.remembered) so that a run with nothing to do neither
hashes a model's weights again nor imports the libraries that read them, and never outlive a change."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from pipeline import provenance
from pipeline.modalities.image_maps import data_config
from pipeline.provenance import sha256_files, sha256_files_remembered
from tests.conftest import ROOT


def test_a_remembered_hash_follows_the_bytes_even_when_the_time_stamp_is_put_back(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = sha256_files_remembered([weights])
    assert first == sha256_files([weights])
    calls = []
    monkeypatch.setattr(provenance, "sha256_files", lambda paths: calls.append(paths) or "recomputed")
    assert sha256_files_remembered([weights]) == first and calls == []  # unchanged: not hashed again

    info = os.stat(weights)
    weights.write_bytes(b"b" * 1000)  # same size, and the old modification time put back
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert sha256_files_remembered([weights]) == "recomputed" and len(calls) == 1


def test_a_damaged_cache_entry_is_recomputed_not_trusted(tmp_path, remembered_values):
    calls = []
    key = {"test": str(tmp_path)}
    assert provenance.remembered("probe", key, lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    entry = remembered_values / "probe" / f"{provenance.digest(key)}.json"
    entry.write_text("{not json")
    assert provenance.remembered("probe", key, lambda: calls.append(1) or {"x": 2}) == {"x": 2}
    assert len(calls) == 2 and json.loads(entry.read_text())["value"] == {"x": 2}


def test_a_failed_computation_is_not_remembered(tmp_path):
    key = {"test": str(tmp_path)}

    def refuse():
        raise ValueError("refused")

    for _ in range(2):
        try:
            provenance.remembered("probe", key, refuse)
        except ValueError:
            pass
        else:
            raise AssertionError("a refusal was remembered")


LIBRARIES = "print(sorted(m for m in ('transformers', 'timm', 'torchvision') if m in sys.modules))"


def test_an_unchanged_extract_imports_no_model_library(tiny, tmp_path):
    """title_cam (a transformers model) and title_bpe with nothing to do: the stores are checked against the
    remembered config and weights hash, and transformers is never imported."""
    w = tmp_path / "work"
    shutil.copytree(tiny.workdir, w, symlinks=True)
    probe = ("import sys, cli\nfor name in ('title_cam', 'title_bpe'):\n"
             f"    sys.argv = ['pipeline', 'extract', name, '--catalog', {str(tiny.catalog)!r}, '--workdir', "
             f"{str(w)!r}, '--config', {str(tiny.config)!r}]\n"
             "    try:\n        cli.main()\n    except SystemExit as e:\n        assert not e.code, e.code\n"
             f"{LIBRARIES}")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("nothing to do") == 2, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_the_image_extractor_is_described_without_timm_once_remembered():
    """The image store's producer (timm's data config of the model) is the same whether timm computed it in
    this process or it was remembered from another, and the second process imports neither timm nor
    torchvision."""
    probe = ("import sys, json, torch\nfrom pipeline.modalities.image_maps import ImageMaps\n"
             "x = ImageMaps('efficientnet_b0', None, torch.device('cpu'), input_size=96, batch_size=4, "
             "decode_workers=1, decode_device='cpu', cache_at='', max_bytes=1 << 20)\n"
             f"print(json.dumps(x.producer))\n{LIBRARIES}")
    runs = [subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                           env=os.environ | {"PYTHONPATH": str(ROOT)}) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    (first, first_libs), (second, second_libs) = (r.stdout.strip().splitlines()[-2:] for r in runs)
    assert json.loads(first) == json.loads(second)
    want = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config("efficientnet_b0", 96).items()}
    assert json.loads(first)["config"] == want and want["input_size"] == [3, 96, 96]
    assert second_libs == "[]", second_libs
