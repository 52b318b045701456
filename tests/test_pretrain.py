"""Stage 2, pretrain (paper 3.4, Table 1): the training reader, per-modality training, static baseline,
resuming, reruns, torchrun, and the errors a user can act on."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.config import TINY_CONFIG, PROJECT_ROOT, load_config
from pipeline.distributed import Dist
from pipeline.errors import PipelineError
from pipeline.checkpoint import load_model
from pipeline.pretrain import pretrain
from pipeline.train_reader import TrainReader
from stores import ArraySpec, FeatureStore, fingerprint
from tests.conftest import Log, cli, reader_settings, store_layout

CODES = [10, 40, 50, 60, 1140, 1160]  # a few real product type codes
# Small networks for the directly-built stores: each run takes a second or two.
SMALL = {"epochs": 4, "batch_size": 32, "channels": 16, "depth": 8, "width": 8, "dropout": 0.0, "lr": 1e-2,
         "decay": 0.9, "loss": "balanced"}


# Tiny tensors: a second intra-op thread only spins (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def demo_cfg(**pretrain_over):
    return load_config(TINY_CONFIG).merged({"pretrain": pretrain_over}) if pretrain_over else load_config(TINY_CONFIG)


# ---------------------------------------------------------------------- directly-built stores
def write_split(workdir: Path, ids: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> pl.DataFrame:
    split = np.where(rng.random(len(ids)) < 0.25, "valid", "train")
    split[rng.random(len(ids)) < 0.05] = "test"
    df = pl.DataFrame({"item_id": ids, "split": split, "label": labels}, schema_overrides={"label": pl.Int64})
    workdir.mkdir(parents=True, exist_ok=True)
    df.write_parquet(workdir / "split.parquet")
    return df


def token_store(workdir: Path, modality: str = "title_cam", n: int = 600, hidden: int = 16, seed: int = 0,
                empty_fraction: float = 0.0, suffix: str = ".zarr", producer: str = "synthetic") -> pl.DataFrame:
    """A title_cam-shaped store whose token features carry the class: each class has its own 'words'."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**6, size=n, replace=False).astype(np.int64)
    labels = rng.choice(CODES, size=n)
    words = rng.standard_normal((len(CODES), 4, hidden)) * 1.5
    noise_words = rng.standard_normal((20, hidden))
    lengths = rng.integers(3, 25, size=n)
    lengths[rng.random(n) < empty_fraction] = 0  # an empty description: a row with no tokens
    tokens = []
    for code, k in zip(labels, lengths):
        c = CODES.index(code)
        own = rng.random(k) < 0.4
        t = np.where(own[:, None], words[c, rng.integers(0, 4, k)], noise_words[rng.integers(0, 20, k)])
        tokens.append((t + 0.3 * rng.standard_normal(t.shape)).astype(np.float16))
    path = workdir / "features" / f"{modality}{suffix}"
    store = FeatureStore.create(path, modality, {"tokens": ArraySpec("float16", (hidden,), ragged=True)},
                                {"model": producer}, ids, fingerprint([str(i) for i in ids]),
                                {"tokens": lengths}, block_rows=64, **store_layout())
    pos = {int(i): k for k, i in enumerate(ids)}
    for b in store.pending_blocks():
        rows = [pos[int(i)] for i in store.block_ids(b)]
        store.write_block(b, {"tokens": np.concatenate([tokens[r] for r in rows]).reshape(-1, hidden)},
                          (lengths[rows] == 0).astype(np.uint8))
    store.close()
    return write_split(workdir, ids, labels, rng)


def image_store(workdir: Path, n: int = 600, channels: int = 16, seed: int = 0, missing_fraction: float = 0.15):
    """An image-shaped store: class-dependent maps; missing photos hold *decoy* maps (another class's)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**6, size=n, replace=False).astype(np.int64)
    labels = rng.choice(CODES, size=n)
    protos = rng.standard_normal((len(CODES), channels, 1, 1)) * 1.5
    maps = protos[[CODES.index(c) for c in labels]] + 0.5 * rng.standard_normal((n, channels, 3, 3))
    missing = (rng.random(n) < missing_fraction).astype(np.uint8)
    maps[missing > 0] = protos[0] * 4  # not zeros, and not data: must never be read as a photo
    store = FeatureStore.create(workdir / "features" / "image.zarr", "image",
                                {"maps": ArraySpec("float16", (channels, 3, 3))}, {"model": "synthetic"},
                                ids, fingerprint([str(i) for i in ids]), None, block_rows=64, **store_layout())
    pos = {int(i): k for k, i in enumerate(ids)}
    for b in store.pending_blocks():
        rows = [pos[int(i)] for i in store.block_ids(b)]
        store.write_block(b, {"maps": maps[rows].astype(np.float16)}, missing[rows])
    store.close()
    return write_split(workdir, ids, labels, rng), ids[missing > 0]


def small_cfg(modality: str, **over):
    small = {k: v for k, v in SMALL.items() if modality != "image" or k not in ("channels", "dropout")}
    return demo_cfg(**{modality: small | over})


# ---------------------------------------------------------------------- the reader
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_reader_serves_every_item_once_with_its_own_tokens(tmp_path, suffix):
    split = token_store(tmp_path, n=400, empty_fraction=0.1, suffix=suffix)
    store = FeatureStore(tmp_path / "features" / f"title_cam{suffix}")
    ids = split["item_id"].to_numpy()[::2]
    labels = np.arange(len(ids)) % 6
    truth = store.read("tokens", ids)
    by_id = {int(i): (truth[k], int(labels[k])) for k, i in enumerate(ids)}
    for mode in ("memory", "stream"):
        for world in (1, 2, 3):
            seen, steps = [], set()
            for rank in range(world):
                settings = reader_settings(mode=mode, buffer_blocks=2, length_sort_window=16, max_tokens=0)
                reader = TrainReader(store, "tokens", "tokens", ids, labels, settings, batch_size=16, rank=rank,
                                     world_size=world, seed=3)
                steps.add(len(reader))
                n = 0
                for batch in reader.epoch(1):
                    n += 1
                    x, mask = batch.inputs
                    assert x.dtype == torch.float32 and mask.dtype == torch.bool and len(batch) <= 16
                    assert x.shape[1] == max(int(mask.sum(1).max()), 1)  # padded to the batch's longest row
                    for k, i in enumerate(batch.ids.tolist()):
                        tok, lab = by_id[i]
                        assert int(mask[k].sum()) == len(tok) and bool(mask[k, : len(tok)].all())
                        np.testing.assert_array_equal(x[k, : len(tok)].numpy(), tok.astype(np.float32))
                        assert not x[k, len(tok):].any() and int(batch.labels[k]) == lab
                        seen.append(i)
                assert n == len(reader)
            assert len(steps) == 1, "every rank must make the same number of steps"
            assert sorted(seen) == sorted(by_id), f"{mode}, {world} ranks: items lost or repeated"
    # Shuffled by (seed, epoch): the same epoch twice is the same, another epoch differs.
    reader = TrainReader(store, "tokens", "tokens", ids, labels, reader_settings(mode="stream", buffer_blocks=2),
                         batch_size=16)
    first = [b.ids.tolist() for b in reader.epoch(5)]
    assert first == [b.ids.tolist() for b in reader.epoch(5)] != [b.ids.tolist() for b in reader.epoch(6)]


def test_reader_picks_streaming_over_budget_and_flags_missing_images(tmp_path):
    split, missing_ids = image_store(tmp_path, n=300)
    ids = split["item_id"].to_numpy()
    path = tmp_path / "features" / "image.zarr"
    small = TrainReader(path, "maps", "fixed", ids, np.zeros(len(ids)), reader_settings(), batch_size=50)
    tight = TrainReader(path, "maps", "fixed", ids, np.zeros(len(ids)), reader_settings(), batch_size=50,
                        memory_bytes=small.nbytes // 2)
    assert small.mode == "memory" and tight.mode == "stream"
    for reader in (small, tight):
        got = 0
        for batch in reader.epoch(0):
            maps, present = batch.inputs
            absent = np.isin(batch.ids.numpy(), missing_ids)
            np.testing.assert_array_equal(present.numpy(), ~absent)
            assert not maps[~present].any()  # the decoy maps never reach the model
            got += len(batch)
        assert got == len(ids)


# ---------------------------------------------------------------------- title_bpe on a synthetic catalogue
@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    from pipeline.extract import extract
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("bpe")
    synthesize(root / "catalog", items=3000, seed=0)
    cfg = demo_cfg()
    extract("title_bpe", root / "catalog", root / "w", cfg, progress=False, log=lambda *_: None)
    torch.set_num_threads(1)
    log = Log()
    metrics = pretrain("title_bpe", root / "w", cfg, progress=False, log=log)
    return root, cfg, metrics, log


@pytest.mark.slow
def test_title_bpe_learns_and_writes_its_outputs(bpe_run):
    root, cfg, metrics, log = bpe_run
    out = root / "w" / "models" / "title_bpe"
    split = pl.read_parquet(root / "w" / "split.parquet")
    valid = split.filter(pl.col("split") == "valid")
    # 27 classes: chance is ~0.04; a bag-of-BPE-ids logistic regression gets ~0.41 on this catalogue.
    assert metrics["macro_f1"] > 0.25, log.text()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["macro_f1"] == metrics["macro_f1"] and 0 <= on_disk["macro_f1"] <= 1
    assert all(k.isdigit() and 0 <= v <= 1 for k, v in on_disk["per_class_f1"].items())
    assert len(on_disk["per_class_f1"]) >= 20
    for key in ("accuracy", "epochs", "best_epoch", "seconds", "coder", "device"):
        assert key in on_disk
    assert on_disk["coder"] == "trainable" and on_disk["epochs"] == 12 and 1 <= on_disk["best_epoch"] <= 12
    assert on_disk["valid_items"] == len(valid)
    # The checkpoint rebuilds the network and reproduces the validation predictions.
    ckpt = load_model(out)
    model = ckpt.network()
    assert ckpt.coder == "trainable" and ckpt.class_codes == sorted(split.filter(
        pl.col("split") != "test")["label"].unique().to_list())
    assert ckpt.store["provenance"]["kind"] == "title_bpe" and ckpt.store["path"].endswith("title_bpe.zarr")
    preds = pl.read_parquet(out / "valid_predictions.parquet")
    assert sorted(preds["item_id"].to_list()) == sorted(valid["item_id"].to_list())
    codes = np.asarray(ckpt.class_codes)
    reader = TrainReader(FeatureStore(root / "w" / "features" / "title_bpe.zarr"), "tokens", "ids",
                         preds["item_id"].to_numpy(), np.zeros(len(preds)), reader_settings(), batch_size=256,
                         shuffle=False)
    logits = {}
    with torch.no_grad():
        for batch in reader.epoch(0):
            logits.update(zip(batch.ids.tolist(), model(*batch.inputs)))
    col = {int(c): j for j, c in enumerate(codes)}
    for item, predicted in zip(preds["item_id"].to_list(), preds["predicted"].to_list()):
        # exact on the CPU; a run on a GPU (TF32 convolutions) may flip an argmax between near-tied classes
        assert logits[item][col[predicted]] >= logits[item].max() - 1e-3 * (1 + logits[item].abs().max())
    assert any("epoch 12/12" in line and "valid macro-F1" in line for line in log)


@pytest.mark.slow
def test_rerun_with_unchanged_inputs_does_nothing(bpe_run):
    root, cfg, metrics, _ = bpe_run
    model_pt = root / "w" / "models" / "title_bpe" / "model.pt"
    before = model_pt.stat().st_mtime_ns
    log = Log()
    again = pretrain("title_bpe", root / "w", cfg, progress=False, log=log)
    assert "nothing to do" in log.text() and len(log) == 1
    assert again["macro_f1"] == metrics["macro_f1"] and model_pt.stat().st_mtime_ns == before


@pytest.mark.slow
def test_batches_drawn_another_way_retrain(bpe_run, tmp_path):
    """Length-sorted training batches give another model (they skew BatchNorm): not "nothing to do"."""
    root, cfg, metrics, _ = bpe_run
    shutil.copytree(root / "w", tmp_path / "w")
    sorted_cfg = cfg.merged({"train_reader": {"length_sort_window": 16}})
    log = Log()
    pretrain("title_bpe", tmp_path / "w", sorted_cfg, progress=False, log=log)
    assert "nothing to do" not in log.text() and "starting afresh" in log.text()


@pytest.mark.slow
def test_trainable_coder_beats_static_on_title_bpe(bpe_run, tmp_path):
    root, cfg, trained, _ = bpe_run
    w = tmp_path / "w"
    shutil.copytree(root / "w" / "features", w / "features")
    shutil.copy(root / "w" / "split.parquet", w / "split.parquet")
    log = Log()
    static = pretrain("title_bpe", w, cfg, coder="static", progress=False, log=log)
    assert static["coder"] == "static" and "static EMDE fitted" in log.text()
    ckpt = load_model(w / "models" / "title_bpe")
    model = ckpt.network()
    assert ckpt.coder == "static" and model.coder.fitted
    assert trained["macro_f1"] > static["macro_f1"] + 0.1, (trained["macro_f1"], static["macro_f1"])


# ---------------------------------------------------------------------- other modalities, directly-built stores
def test_title_cam_like_store_trains(tmp_path):
    token_store(tmp_path / "w", "title_cam")
    metrics = pretrain("title_cam", tmp_path / "w", small_cfg("title_cam"), progress=False, log=Log())
    assert metrics["macro_f1"] > 0.8, metrics["history"]  # 6 classes: chance ~0.17


def test_desc_cam_with_empty_descriptions_trains(tmp_path):
    token_store(tmp_path / "w", "desc_cam", empty_fraction=0.3, seed=1)
    metrics = pretrain("desc_cam", tmp_path / "w", small_cfg("desc_cam", kernel_sizes=[2, 3, 4, 5]),
                       progress=False, log=Log())
    # 30% of the items have nothing to go on: F1 stays well above chance (~0.17) all the same
    assert metrics["macro_f1"] > 0.45, metrics["history"]


def test_image_like_store_trains_and_ignores_missing_photos(tmp_path):
    split, missing_ids = image_store(tmp_path / "w")
    metrics = pretrain("image", tmp_path / "w", small_cfg("image", lr=1e-2), progress=False, log=Log())
    assert metrics["macro_f1"] > 0.7, metrics["history"]  # 6 classes: chance ~0.17
    model = load_model(tmp_path / "w" / "models" / "image").network()
    store = FeatureStore(tmp_path / "w" / "features" / "image.zarr")
    all_ids = split["item_id"].to_numpy()
    ids = np.concatenate([missing_ids[:20], all_ids[~np.isin(all_ids, missing_ids)][:20]])
    reader = TrainReader(store, "maps", "fixed", ids, np.zeros(len(ids)), reader_settings(), batch_size=64,
                         shuffle=False)
    with torch.no_grad():
        batch = next(iter(reader.epoch(0)))
        sketches = model.sketch(*batch.inputs)
        absent = np.isin(batch.ids.numpy(), missing_ids)
        # every missing photo gets the same sketch (the learned `missing` vector), whatever the store holds
        assert absent.sum() == 20 and torch.allclose(sketches[absent], sketches[absent][:1].expand(20, -1))
        raw = torch.from_numpy(store.read("maps", batch.ids.numpy()[absent]).astype(np.float32))
        assert raw.abs().sum() > 0  # ... and the store does hold (decoy) maps for them
        assert not torch.allclose(sketches[~absent][0], sketches[absent][0])


# ---------------------------------------------------------------------- resume, rerun, config changes
def test_killed_run_resumes_from_its_last_epoch_and_matches_an_uninterrupted_one(tmp_path):
    token_store(tmp_path / "a", "title_cam")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cfg = small_cfg("title_cam", dropout=0.1)
    straight = pretrain("title_cam", tmp_path / "a", cfg, progress=False, log=Log())

    class Killed(Exception):
        pass

    def killer(msg):
        if "epoch 2/4:" in msg:
            raise Killed  # dies right after epoch 2's checkpoint, like a SIGKILL between epochs

    with pytest.raises(Killed):
        pretrain("title_cam", tmp_path / "b", cfg, progress=False, log=killer)
    out = tmp_path / "b" / "models" / "title_cam"
    assert torch.load(out.parent / ".title_cam.partial" / "last.pt", weights_only=True)["progress"]["epoch"] == 2
    assert not out.exists()  # nothing is swapped in before the run completes
    log = Log()
    resumed = pretrain("title_cam", tmp_path / "b", cfg, progress=False, log=log)
    assert "resuming" in log.text() and "after epoch 2/4" in log.text()
    assert not any("epoch 1/4:" in line or "epoch 2/4:" in line for line in log)  # not from epoch 0
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])  # deterministic on the CPU
    assert resumed["macro_f1"] == straight["macro_f1"]

    # More epochs continue the finished run; another learning rate starts afresh and says so.
    log = Log()
    longer = pretrain("title_cam", tmp_path / "b", small_cfg("title_cam", dropout=0.1, epochs=5), progress=False,
                      log=log)
    assert "after epoch 4/5" in log.text() and len(longer["history"]) == 5
    log = Log()
    pretrain("title_cam", tmp_path / "b", small_cfg("title_cam", dropout=0.1, lr=5e-3), progress=False, log=log)
    assert "starting afresh" in log.text() and "epoch 1/4:" in log.text()


def test_a_killed_retraining_leaves_the_previous_model_in_place(tmp_path):
    token_store(tmp_path / "w", "title_cam")
    pretrain("title_cam", tmp_path / "w", small_cfg("title_cam", epochs=2), progress=False, log=Log())
    out = tmp_path / "w" / "models" / "title_cam"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class Killed(Exception):
        pass

    def killer(msg):
        if "epoch 1/3:" in msg:
            raise Killed

    with pytest.raises(Killed):  # another config: a new run, interrupted after its first epoch
        pretrain("title_cam", tmp_path / "w", small_cfg("title_cam", epochs=3, lr=5e-3), progress=False, log=killer)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    log = Log()
    pretrain("title_cam", tmp_path / "w", small_cfg("title_cam", epochs=2), progress=False, log=log)
    assert "nothing to do" in log.text()


def test_changed_store_is_not_resumed(tmp_path):
    token_store(tmp_path / "w", "title_cam")
    cfg = small_cfg("title_cam", epochs=2)
    pretrain("title_cam", tmp_path / "w", cfg, progress=False, log=Log())
    FeatureStore.remove(tmp_path / "w" / "features" / "title_cam.zarr")
    token_store(tmp_path / "w", "title_cam", producer="another model")  # same items, other features
    log = Log()
    pretrain("title_cam", tmp_path / "w", cfg, progress=False, log=log)
    assert "nothing to do" not in log.text() and "starting afresh" in log.text()


# ---------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    split = token_store(tmp_path / "w", "title_cam", n=800)
    config = tmp_path / "small.toml"
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (SMALL | {"epochs": 2, "device": "cpu"}).items())
    config.write_text(f'base = "{TINY_CONFIG}"\n[pretrain.title_cam]\n{table}\n')
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cli", "pretrain", "title_cam", "--workdir", str(tmp_path / "w"), "--config", str(config)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "w" / "models" / "title_cam"
    metrics = json.loads((out / "metrics.json").read_text())
    valid = split.filter(pl.col("split") == "valid")["item_id"].sort().to_list()
    assert metrics["world_size"] == 2 and metrics["valid_items"] == len(valid)
    assert all(h["valid_items"] == len(valid) for h in metrics["history"])
    assert pl.read_parquet(out / "valid_predictions.parquet")["item_id"].sort().to_list() == valid
    assert proc.stderr.count("epoch 2/2:") == 1  # one summary line per epoch: rank 0 speaks


def test_more_processes_than_gpus_is_refused_before_nccl(monkeypatch):
    # NCCL cannot put two ranks on one GPU ("Duplicate GPU detected"); the user gets what to run instead
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # no process group started here
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(PipelineError, match=r"2 processes on this machine but 1 CUDA device.*"
                                            r"--nproc_per_node 1.*\[pretrain\] device = 'cpu'"):
        Dist("auto", "[pretrain] device")
    # each process bound to its own GPU (Slurm's --gpus-per-task=1): one visible device each, and right
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert Dist("auto", "[pretrain] device").device == torch.device("cuda", 0)


# ---------------------------------------------------------------------- errors
def test_missing_inputs_name_the_command_that_builds_them(tmp_path):
    with pytest.raises(PipelineError, match=r"pipeline extract title_cam"):
        pretrain("title_cam", tmp_path / "w", demo_cfg(), progress=False, log=Log())  # no split yet
    token_store(tmp_path / "w", "title_cam")
    with pytest.raises(PipelineError, match=r"no desc_cam features .*pipeline extract desc_cam"):
        pretrain("desc_cam", tmp_path / "w", demo_cfg(), progress=False, log=Log())
    with pytest.raises(PipelineError, match=r"\[pretrain.title_cam\] coder: input should be 'trainable' or 'static'"):
        pretrain("title_cam", tmp_path / "w", demo_cfg(), coder="magic", progress=False, log=Log())
    with pytest.raises(PipelineError, match="unknown modality"):
        pretrain("sound", tmp_path / "w", demo_cfg(), progress=False, log=Log())
    proc = cli("pretrain", "image", "--workdir", tmp_path / "w")
    assert proc.returncode == 1 and "pipeline extract image" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_stream_groups_smaller_than_a_batch_carry_over_without_an_empty_batch(tmp_path):
    """A buffer group holding fewer of the reader's rows than one batch (sparse ids, a large batch, as a
    validation set of 100,000 items meets) is carried into the next group; no batch is ever empty."""
    split = token_store(tmp_path, n=400, empty_fraction=0.1, suffix=".zarr")
    store = FeatureStore(tmp_path / "features" / "title_cam.zarr")
    ids = split["item_id"].to_numpy()[::9]
    for shuffle, window in ((False, 0), (True, 0), (True, 4)):
        reader = TrainReader(store, "tokens", "tokens", ids, np.zeros(len(ids), np.int64),
                             reader_settings(mode="stream", buffer_blocks=1, length_sort_window=window),
                             batch_size=64, shuffle=shuffle)
        batches = [b.ids.tolist() for b in reader.epoch(0)]
        assert len(batches) == len(reader) and all(batches), [len(b) for b in batches]
        assert sorted(i for b in batches for i in b) == sorted(ids.tolist())
