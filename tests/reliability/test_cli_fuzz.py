"""No input makes the `pipeline` command print a traceback.

Hypothesis drives `cli.main` in-process (seconds, not a subprocess per example) with random argument
values, random config values and random catalogue bytes. Every run must end with exit status 0, or
with status 1 and exactly one `error: ...` line; never with an exception escaping `main`. The examples
are derandomized (the same ones on every run) and few, so the whole module stays within a minute. Output
settings (`[fusion] output`, `--out`) and the files of a trained work directory (its record, stamps, tokenizer,
store metadata) are fuzzed too: whatever they hold, nothing outside the output a command owns changes.
"""
from __future__ import annotations

import shutil
import tempfile
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.synth import synthesize

from tests.conftest import cli, one_error_line

from .conftest import DEMO, ROOT, TRAINED, copy_workdir, snapshot

FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
MODALITIES = ["title_bpe", "title_cam", "all", "image", "nope", "", "TITLE_BPE", "../title_bpe"]
INTS = ["-5", "-1", "0", "1", "2", "3", "99999999999999999999", "-9223372036854775809", "1e3", "abc", "", " 7"]
SHARDS = ["0/1", "0/2", "1/2", "3/2", "2/2", "-1/2", "0/0", "1/", "/", "a/b", "0/2/4", "99999999999999999999/2"]
TEXT = st.sampled_from(["", " ", "-", "--", "x", "é", "\x00", "/", "a" * 300]) | st.text(max_size=12)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz") / "catalog"
    synthesize(directory, items=40, seed=5, missing_image_fraction=0.0)
    return directory


def answered(argv: list[str]) -> None:
    """`pipeline ARGV...` ends with status 0, or 1 and one `error:` line (an escaping exception fails)."""
    done = cli(*argv)
    assert "Traceback" not in done.stderr and done.returncode in (0, 1), (argv, done.returncode, done.stderr[-3000:])
    if done.returncode == 1:
        one_error_line(done)


def arguments(catalog: str, workdir: str, config: str):
    """Argument lists for every command, with awkward values where a user types one."""
    opt_config = st.sampled_from([[], ["--config", config], ["--config", "nope.toml"], ["--config", catalog]])
    return st.one_of(
        st.tuples(st.just(["data", "synth", f"{workdir}/synth"]), st.sampled_from([[], ["--items"]]), st.lists(
            st.sampled_from(INTS), min_size=1, max_size=1), st.sampled_from([[], ["--seed", "-1"], ["--seed", "3"]])),
        st.tuples(st.just(["extract"]), st.lists(st.sampled_from(MODALITIES) | TEXT, min_size=1, max_size=1),
                  st.just(["--catalog", catalog, "--workdir", workdir]), st.sampled_from(
                      [[], ["--backend", "parquet"], ["--backend", "hdf5"], ["--rebuild"], ["--repair"],
                       ["--rebuild", "--repair"], ["--text-model", "/nope"], ["--image-weights", "/nope.pth"]]), st.sampled_from([[], *(["--shard", s] for s in SHARDS)]),
                  opt_config),
        st.tuples(st.sampled_from([["pretrain"], ["sketch"], ["sketch", "--repair"]]),
                  st.lists(st.sampled_from(MODALITIES), min_size=1, max_size=1),
                  st.just(["--workdir", workdir]), opt_config),
        st.tuples(st.just(["fuse", "--workdir"]), st.sampled_from([[workdir], [catalog + "/X_train.csv"], [""]])),
        st.tuples(st.just(["predict", "--catalog", catalog, "--workdir", workdir, "--out"]),
                  st.sampled_from([[workdir], ["/nope/out.csv"], [""], [f"{workdir}/out.csv"], [f"{workdir}/split.csv"],
                                   [f"{workdir}/features/x.csv"], [f"{workdir}/config.json"], ["."], [".."]]),
                  st.sampled_from([[], ["--cache", catalog + "/X_train.csv"], ["--cache", ""]])),
        st.tuples(st.just(["export", "--workdir", workdir]),
                  st.sampled_from([[], ["--out", catalog + "/X_train.csv"], ["--out", ""], ["--out", "/nope/x"]])),
        st.tuples(st.just(["inspect"]), st.sampled_from([[f"{workdir}/features/title_bpe.zarr"], ["x.h5"],
                                                         [catalog], [""], ["s3://"]]),
                  st.sampled_from([[], ["--verify"], ["--json"], *(["--item", v] for v in INTS)])),
        st.lists(TEXT, max_size=3).map(lambda words: [[*words]]),
    ).map(lambda parts: [arg for part in parts for arg in part])


@pytest.mark.slow
def test_any_arguments_get_an_answer_not_a_traceback(catalogue, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths ("", ".", "x") land here
    config = tmp_path / "demo.toml"
    config.write_text(f'base = "{DEMO}"\n[stores]\nblock_items = 16\n[title_bpe]\nblock_items = 16\n')

    @settings(FUZZ, max_examples=100)
    @given(arguments(str(catalogue), str(tmp_path / "w"), str(config)))
    def check(argv):
        try:
            answered(argv)
        finally:
            shutil.rmtree(tmp_path / "w", ignore_errors=True)

    check()


# ---------------------------------------------------------------------- config values
def _keys(table: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in table.items():
        out += _keys(value, prefix + (key,)) if isinstance(value, dict) and value else [prefix + (key,)]
    return out


DEFAULT_KEYS = _keys(tomllib.loads((ROOT / "configs" / "default.toml").read_text()))
VALUES = st.sampled_from([-1, 0, 1, 3, 17, 2**40, 0.5, -2.5, float("inf"), float("nan"), True, "", "x", "auto", "../..",
                          "utf8-lossy", "latin-1", ";", [], [0], ["x"], {}])


def toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return {"inf": "inf", "nan": "nan"}.get(str(value), repr(value))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{}" if isinstance(value, dict) else str(value)


def test_any_config_value_is_refused_in_one_line_or_used(catalogue, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths ([stores] root = "x") land here
    @settings(FUZZ, max_examples=40)
    @given(st.sampled_from(DEFAULT_KEYS), VALUES)
    def check(key, value):
        config = tmp_path / "fuzz.toml"
        table, name = ".".join(f'"{k}"' for k in key[:-1]), key[-1]
        config.write_text(f'base = "{DEMO}"\n' + (f"[{table}]\n" if table else "") + f'"{name}" = {toml_value(value)}\n')
        argv = ["extract", "title_bpe", "--catalog", str(catalogue), "--workdir", str(tmp_path / "w"), "--config",
                str(config)]
        try:
            answered(argv)
        finally:
            shutil.rmtree(tmp_path / "w", ignore_errors=True)

    check()


# ---------------------------------------------------------------------- catalogue bytes
def mutations(good: bytes):
    """The good file with bytes replaced, inserted or cut: the damage a real file gets."""
    awkward = st.sampled_from([b'"', b",", b";", b"\n", b"\r", b"\x00", b"\xe9", b"\xff\xfe", b"-", b"9" * 25, b""])
    edit = st.tuples(st.integers(0, len(good)), st.integers(0, 8), awkward | st.binary(max_size=6))

    def apply(edits):
        data = good
        for at, cut, insert in edits:
            data = data[:at] + insert + data[at + cut:]
        return data
    return st.lists(edit, min_size=1, max_size=4).map(apply)


def test_any_catalogue_bytes_are_read_or_refused_in_one_line(catalogue, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good_x = (catalogue / "X_train.csv").read_bytes()[:3000]
    good_x = good_x[: good_x.rindex(b"\n") + 1]  # whole rows only: ~15 items
    good_y = (catalogue / "Y_train.csv").read_bytes()

    @settings(FUZZ, max_examples=40)
    @given(mutations(good_x), mutations(good_y) | st.just(good_y))
    def check(x, y):
        d = Path(tempfile.mkdtemp(prefix="cat-", dir=tmp_path))
        (d / "X_train.csv").write_bytes(x)
        (d / "Y_train.csv").write_bytes(y)
        argv = ["extract", "title_bpe", "--catalog", str(d), "--workdir", str(d / "w"), "--config", str(DEMO)]
        try:
            answered(argv)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    check()


# ---------------------------------------------------------------------- output settings
OUTPUTS = st.sampled_from([".", "..", "/tmp", "features", "models", "models/title_bpe", "split.parquet", "config.json",
                           "tokenizers", "upstream", "export", "Features", ".hidden", "fusion/..", "fusion2", "a" * 300,
                           "fusion\x00", "~", "$HOME", "fusion ", "-"]) | TEXT


def owned(w: Path, command: str, output: str, changed: str) -> bool:
    """Whether `changed` (a path under W) is the output `command` was given (the fusion folder, the --out file
    and its .parquet beside it, the --out folder of export), provided that is neither W itself nor one of the
    entries a trained W holds."""
    path, target, root = (w / changed).resolve(), (w / output).resolve(), w.resolve()
    theirs = [(w / entry).resolve() for entry in TRAINED]
    mine = [target, target.with_suffix(".parquet") if command == "predict" and target.name else target]
    mine = [m for m in mine if m != root and m.is_relative_to(root) and
            not any(m == e or m.is_relative_to(e) for e in theirs)]
    return changed.startswith(".locks/") or any(path == m or path.is_relative_to(m) for m in mine)


@pytest.mark.slow
def test_output_settings_never_touch_another_stages_output(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)

    @settings(FUZZ, max_examples=16)
    @example(".", "fuse")  # once: the fusion renamed over the whole work directory
    @example("split.csv", "predict")  # once: its .parquet beside it replaced W/split.parquet
    @given(OUTPUTS, st.sampled_from(["fuse", "predict", "export"]))
    def check(output, command):
        config = tmp_path / "out.toml"
        config.write_text(f'base = "{tiny.config}"\n[fusion]\noutput = {toml_value(output)}\n')
        argv = {"fuse": ["fuse", "--workdir", w, "--config", config],
                "predict": ["predict", "--catalog", tiny.catalog, "--workdir", w, "--out", w / output],
                "export": ["export", "--workdir", w, "--out", w / output]}[command]
        before = snapshot(w)
        answered(list(map(str, argv)))
        after = snapshot(w)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        assert all(owned(w, command, output, k) for k in changed), (output, command, sorted(changed)[:5])

    check()


# ---------------------------------------------------------------------- the files of a work directory
WORKDIR_FILES = {  # a file of a trained work directory -> a command that reads it
    "config.json": ["fuse"],
    "models/title_bpe/stamp.json": ["pretrain", "title_bpe"],
    "fusion/stamp.json": ["fuse"],
    "tokenizers/title_bpe.json": ["extract", "title_bpe", "--catalog", "{catalog}"],
    "tokenizers/title_bpe.model": ["extract", "title_bpe", "--catalog", "{catalog}"],
    "features/title_bpe.zarr/zarr.json": ["extract", "title_bpe", "--catalog", "{catalog}"],
    "features/title_bpe.zarr/tokens/values/zarr.json": ["inspect", "{w}/features/title_bpe.zarr", "--item", "5"],
    "features/title_bpe.zarr/ids/zarr.json": ["extract", "title_bpe", "--catalog", "{catalog}"],
    "sketches/title_bpe.zarr/zarr.json": ["inspect", "{w}/sketches/title_bpe.zarr", "--verify"],
}
LIGHT = shutil.ignore_patterns("title_cam.zarr", "last.pt", "upstream", "*.png")  # what these commands never read


def test_any_bytes_in_a_work_directorys_files_get_one_line_or_an_answer(tiny, tmp_path):
    files = sorted(WORKDIR_FILES)

    @settings(FUZZ, max_examples=24)
    @example(("features/title_bpe.zarr/zarr.json", b"null"))  # once a traceback from zarr's own parser
    @given(st.sampled_from(files).flatmap(lambda f: st.tuples(
        st.just(f), mutations((tiny.workdir / f).read_bytes()[:4000]) | st.sampled_from([b"", b"[]", b"{}", b"null"]))))
    def check(case):
        name, data = case
        w = Path(shutil.copytree(tiny.workdir, Path(tempfile.mkdtemp(dir=tmp_path)) / "w", ignore=LIGHT))
        try:
            (w / name).write_bytes(data)
            command = [a.format(catalog=tiny.catalog, config=tiny.config, w=w) for a in WORKDIR_FILES[name]]
            answered(command + (["--workdir", str(w)] if command[0] != "inspect" else []))
        finally:
            shutil.rmtree(w.parent, ignore_errors=True)

    check()
