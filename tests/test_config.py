"""How configs merge: a [pretrain] key reaches every modality, --set is TOML, and the record of a work
directory keeps what was resolved."""
from __future__ import annotations

import pytest

from pipeline import modalities
from pipeline.config import ConfigError, load_config
from pipeline.workdir import load, remember

MODALITIES = modalities.names()


def _over(tmp_path, text: str, base: str = "configs/demo.toml"):
    path = tmp_path / "mine.toml"
    path.write_text(f'base = "{base}"\n{text}' if base else text)
    return path


@pytest.mark.parametrize("base", ["", "demo.toml", "rakuten-real.toml"])
def test_a_pretrain_key_of_a_users_file_reaches_every_modality(tmp_path, base):
    cfg = load_config(_over(tmp_path, "[pretrain]\nepochs = 1\nbatch_size = 8\n", base))
    assert {m: (cfg.train_options(m).epochs, cfg.train_options(m).batch_size) for m in MODALITIES} == \
        {m: (1, 8) for m in MODALITIES}
    # ... as it does through --set, over the same base, and in the record of a work directory built with it
    sets = load_config([base] if base else None, sets=["pretrain.epochs=1"])
    assert {cfg.train_options(m).epochs for m in MODALITIES} == {sets.train_options(m).epochs for m in MODALITIES}
    remember(tmp_path / "w", cfg)
    assert {load(tmp_path / "w").train_options(m).epochs for m in MODALITIES} == {1}


def test_a_modalitys_own_table_wins_in_its_file_and_in_later_ones(tmp_path):
    same = load_config(_over(tmp_path, "[pretrain]\nepochs = 1\n[pretrain.image]\nepochs = 3\n"))
    assert same.train_options("image").epochs == 3 and same.train_options("title_bpe").epochs == 1
    first = _over(tmp_path, "[pretrain]\nepochs = 1\n")
    later = tmp_path / "later.toml"
    later.write_text("[pretrain.image]\nepochs = 3\n")
    both = load_config([first, later])
    assert both.train_options("image").epochs == 3 and both.train_options("title_cam").epochs == 1
    # the other order: the later [pretrain] key overrides the earlier file's modality table
    assert load_config([later, first]).train_options("image").epochs == 1


def test_defaults_state_per_modality_only_what_the_paper_fixes():
    cfg = load_config()
    assert [cfg.train_options(m).lr for m in ("title_bpe", "title_cam", "desc_cam", "image")] == [1e-3, 5e-3, 1e-2, 1e-4]
    assert {cfg.train_options(m).batch_size for m in MODALITIES} == {256}


def test_set_is_read_as_toml_and_applied_after_the_files(tmp_path):
    cfg = load_config(["configs/tiny.toml"], sets=["pretrain.title_bpe.lr=3e-2", "split.valid_items=7",
                                                   'text_model.prefix="query: "', "pretrain.title_bpe.kernel_sizes=[1, 2]",
                                                   "fusion.heads=[{name = 'b', inputs = ['title_bpe']}]"])
    opts = cfg.train_options("title_bpe")
    assert (opts.lr, opts.kernel_sizes, cfg.split.valid_items, cfg.text_model.prefix) == (3e-2, [1, 2], 7, "query: ")
    assert [h.inputs for h in cfg.fusion.heads] == [["title_bpe"]]
    assert cfg.sets == ("pretrain.title_bpe.lr=3e-2", "split.valid_items=7", 'text_model.prefix="query: "',
                        "pretrain.title_bpe.kernel_sizes=[1, 2]", "fusion.heads=[{name = 'b', inputs = ['title_bpe']}]")


@pytest.mark.parametrize("arg, message", [
    ("pretrain.title_bpe.epohcs=3", r"--set pretrain.title_bpe.epohcs=3: \[pretrain.title_bpe\] epohcs: unknown key "
                                    r"\(did you mean 'epochs'\?\)"),
    ("pretrain.epochs=0", r"--set pretrain.epochs=0: \[pretrain\] epochs: input should be greater than or "
                          r"equal to 1, got 0"),
    ('pretrain.epochs="3"', r"--set pretrain.epochs=\"3\": \[pretrain\] epochs: input should be a valid "
                            r"integer"),
    ("text_model.path=/models/camembert", r"--set text_model.path=/models/camembert: not a TOML key = value .*a "
                                          r"string needs quotes: text_model.path=\"/models/camembert\""),
    ("pretrain.epochs", r"--set pretrain.epochs: expected one section.key=value"),
    ("pretrain.epochs=1\nseed=2", r"expected one section.key=value"),
    ("nope.x=1", r"--set nope.x=1: \[nope\]: unknown table or key"),
])
def test_set_refuses_what_a_config_file_would(arg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["configs/tiny.toml"], sets=[arg])
