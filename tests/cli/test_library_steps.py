"""The command layer is thin: a step called as a library function with a RunEnv makes the artifact
the command makes (same key), reports through the RunEnv only (nothing on stdout or stderr), and
the command run afterwards reuses it and prints the step's own summary document."""

from __future__ import annotations

import contextlib
import json

from typer.testing import CliRunner

from icl_cli.cli.app import app


def _env(store, lines: list, bars: list):
    from icl_cli.core.runenv import RunEnv

    @contextlib.contextmanager
    def progress(total: int, what: str):
        bars.append((total, what, []))
        yield bars[-1][2].append

    return RunEnv(store_path=store, device="cpu", log=lines.append, progress=progress)


def test_collect_and_clean_as_library_steps_match_the_commands(tiny_toy_dir, tmp_path, capfd):
    from icl_cli.clean.step import CleanRequest, run_clean
    from icl_cli.collect.step import CollectRequest, run_collect
    from icl_cli.core.runenv import RunEnv
    from icl_cli.dictionaries.base import DictConfig, build
    from icl_cli.dictionaries.io import save_saelens

    store, lines, bars = tmp_path / "s", [], []
    env = _env(store, lines, bars)
    out = run_collect(env, CollectRequest(model=str(tiny_toy_dir), tasks="antonyms,en_fr", layers="0-1", n_shot=3,
                                          n_prompts=2, n_eval=4, name="tv"))
    key = out.result.artifact.key
    assert not out.result.reused and out.part is None and out.data["key"] == key
    assert f"computing {key[:12]} (step collect)" in lines and lines[-1] == f"saved collect artifact {key[:12]}"
    assert [(total, what, labels) for total, what, labels in bars if what == "collect"][0][:2] == (2, "collect")
    assert capfd.readouterr().out == ""  # library code never prints

    args = ["--store", str(store), "--device", "cpu", "--json", "collect", "--model", str(tiny_toy_dir), "--tasks",
            "antonyms,en_fr", "--layers", "0-1", "--n-shot", "3", "--n-prompts", "2", "--n-eval", "4"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.stderr
    assert "reusing" in res.stderr and json.loads(res.stdout) == json.loads(json.dumps(out.data))

    sae = build(DictConfig(d_in=32, d_sae=64, arch="gated", site="resid_pre", layer=1, model=str(tiny_toy_dir)))
    save_saelens(sae, tmp_path / "sae")
    silent = RunEnv(store_path=store, device="cpu")  # logs and progress dropped
    req = CleanRequest(tv="tv", sae=str(tmp_path / "sae"), l1=0.01, max_steps=3, patience=2, n_train=4)
    cleaned = run_clean(silent, req)
    assert cleaned.result.artifact.step == "clean" and set(cleaned.data["tasks"]) == {"antonyms", "en_fr"}
    assert cleaned.result.artifact.inputs["tv"] == key
    assert capfd.readouterr() == ("", "")
    res = CliRunner().invoke(app, ["--store", str(store), "--device", "cpu", "-q", "clean", "--tv", "tv", "--sae",
                                   str(tmp_path / "sae"), "--l1", "0.01", "--max-steps", "3", "--patience", "2",
                                   "--n-train", "4"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == cleaned.result.artifact.key and "reused clean artifact" in res.stderr
