"""The paper's own models through every stage, with random weights built here (no model hub): a CamemBERT-base-
shaped text model in the hub's layout (`CamembertForMaskedLM` in config.json, `roberta.`/`lm_head.` weights in
model.safetensors, sentencepiece.bpe.model and tokenizer.json as camembert-base ships them) and an
efficientnet_b2 timm state dict, through extract -> pretrain -> sketch -> fuse -> predict on a small catalogue,
from the command line (`--text-model DIR --image-weights FILE`)."""
import json

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.synth import synthesize
from stores import FeatureStore
from tests.conftest import cli

PAPER = "paper.toml"  # the paper's setup: CamemBERT-base (read without a prefix), efficientnet_b2 at 260 px
SMALL = """
[split]
valid_items = 4000
reference_train_items = 20000
[stores]
block_items = 32
[pretrain]
batch_size = 16
epochs = 1
[pretrain.title_bpe]
batch_size = 16
epochs = 1
[pretrain.title_cam]
batch_size = 16
epochs = 1
[pretrain.desc_cam]
batch_size = 16
epochs = 1
[pretrain.image]
batch_size = 16
epochs = 1
[fusion]
batch_size = 16
epochs = 1
"""
HUB_FILES = {"config.json", "model.safetensors", "sentencepiece.bpe.model", "tokenizer.json"}


def camembert_base_like(out, texts: list[str]):
    """A randomly initialised CamemBERT-base (12 x 768) saved as the hub's camembert-base directory, with a small
    SentencePiece vocabulary trained on `texts` (the model's only smaller part)."""
    import sentencepiece as spm
    from transformers import CamembertConfig, CamembertForMaskedLM, CamembertTokenizer

    out.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(out / "sentencepiece.bpe"),
                                   vocab_size=800, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   num_threads=1, minloglevel=2)
    tokenizer = CamembertTokenizer.from_pretrained(str(out), local_files_only=True)
    config = CamembertConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                             layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=5, eos_token_id=6,
                             architectures=["CamembertForMaskedLM"])
    torch.manual_seed(0)
    CamembertForMaskedLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    for extra in set(p.name for p in out.iterdir()) - HUB_FILES:  # tokenizer_config.json and the like
        (out / extra).unlink()
    return out


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """A 48-item catalogue through every stage with the paper's models; 12 new items predicted."""
    import timm

    root = tmp_path_factory.mktemp("paper-models")
    synthesize(root / "catalog", items=48, seed=4, image_size=64)
    synthesize(root / "new", items=12, seed=9, image_size=64)
    titles = pl.read_csv(root / "catalog" / "X_train.csv")["designation"].to_list()
    text_model = camembert_base_like(root / "camembert-base", titles)
    weights = root / "efficientnet_b2.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("efficientnet_b2", pretrained=False).state_dict(), weights)
    config = root / "paper-small.toml"
    config.write_text(f'base = "{PAPER}"\n{SMALL}')
    w = root / "w"
    # the first command records its configuration, flags included, in W; the others read it from there
    stages = [["extract", "all", "--catalog", root / "catalog", "--config", config, "--text-model", text_model,
               "--image-weights", weights],
              *(["pretrain", m] for m in ("title_cam", "desc_cam", "title_bpe", "image")), ["sketch", "all"], ["fuse"],
              ["predict", "--catalog", root / "new", "--out", root / "predictions.csv"]]
    for stage in stages:
        done = cli(*stage, "--workdir", w)
        assert done.returncode == 0, (stage, done.stderr)
    return root, w, text_model


@pytest.mark.slow
def test_the_hub_layout_is_what_the_test_builds(paper_run):
    from safetensors import safe_open

    _, _, text_model = paper_run
    assert {p.name for p in text_model.iterdir()} == HUB_FILES
    assert json.loads((text_model / "config.json").read_text())["architectures"] == ["CamembertForMaskedLM"]
    with safe_open(text_model / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "roberta.encoder.layer.11.output.dense.weight" in keys and "lm_head.dense.weight" in keys
    assert all(k.startswith(("roberta.", "lm_head.")) for k in keys)


@pytest.mark.slow
def test_the_stores_hold_the_paper_models_features(paper_run):
    """768-wide token states equal to the hub model's own encoder output (its `roberta.` weights were loaded, not
    left random), and efficientnet_b2's 1408 x 9 x 9 maps (at the paper's 260 px)."""
    from transformers import AutoTokenizer, CamembertForMaskedLM

    _, w, text_model = paper_run
    with FeatureStore(w / "features" / "title_cam.zarr") as store:
        assert store.specs["tokens"].shape == (768,)
        item = int(store.ids[0])
        stored = store.read("tokens", np.array([item])).values.astype(np.float32)
    with FeatureStore(w / "features" / "image.zarr") as store:
        assert store.specs["maps"].shape == (1408, 9, 9)
    x = pl.read_csv(w.parent / "catalog" / "X_train.csv")
    text = x.filter(pl.col("") == item)["designation"][0]
    tokenizer = AutoTokenizer.from_pretrained(str(text_model))
    model = CamembertForMaskedLM.from_pretrained(str(text_model)).eval()
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        expected = model.roberta(**ids).last_hidden_state[0].numpy()
    assert stored.shape == expected.shape
    np.testing.assert_allclose(stored, expected, rtol=2**-9, atol=2**-9 * np.abs(expected).max())


@pytest.mark.slow
def test_every_stage_ran_and_new_items_are_predicted(paper_run):
    root, w, _ = paper_run
    codes = set(pl.read_parquet(w / "split.parquet")["label"].drop_nulls().to_list())
    for m in ("title_cam", "desc_cam", "title_bpe", "image"):
        assert 0 <= json.loads((w / "models" / m / "metrics.json").read_text())["macro_f1"] <= 1
        assert FeatureStore.exists(w / "sketches" / f"{m}.zarr")
    assert 0 <= json.loads((w / "fusion" / "metrics.json").read_text())["macro_f1"] <= 1
    predicted = pl.read_csv(root / "predictions.csv")
    new = pl.concat([pl.read_csv(root / "new" / f"X_{p}.csv") for p in ("train", "test")])
    assert predicted[""].to_list() == new[""].to_list()
    assert set(predicted["prdtypecode"].to_list()) <= codes
