"""Dictionary suites: the bundled toy-icl suite loads (ours and sae_lens) and gives the FVU its
manifest records; folders import into the store with lineage; a missing (kind, layer) is one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from icl_cli.core.batch import encode_prompts
from icl_cli.core.prompts import sample_prompts
from icl_cli.core.sites import HookedModel, Site
from icl_cli.core.tasks import resolve_tasks
from icl_cli.dictionaries import DictConfig, build, save_saelens
from icl_cli.dictionaries.suite import BUNDLED, KINDS, Suite, import_suite, load_suite
from icl_cli.core.errors import IclError

BUNDLE = BUNDLED["toy-icl-suite"]


# ---- an independent reading of a suite folder ----------------------------------------------------
def gated_by_hand(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """Gated SAE / transcoder reconstruction from the raw SAELens tensors (Rajamanoharan et al. 2024):
    x' = x − b_dec (if applied to the input); gate = [x'W_enc + b_gate > 0];
    a = gate · relu(x'(W_enc ⊙ exp r_mag) + b_mag); x̂ = a W_dec + b_dec."""
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "gated"
    w = {k: v.double() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    x = x.double()
    xin = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    proj = xin @ w["W_enc"]
    a = (proj + w["b_gate"] > 0).double() * torch.relu(proj * torch.exp(w["r_mag"]) + w["b_mag"])
    return a @ w["W_dec"] + w["b_dec"]


# ---- float32 rounding bounds (Higham, Accuracy and Stability of Numerical Algorithms, §3.1) -------
U32 = 2.0**-24  # unit roundoff of float32


def gamma(n: int) -> float:
    """γ_n = n·u / (1 − n·u): |fl(Σ_{i≤n} a_i b_i) − Σ a_i b_i| ≤ γ_n Σ |a_i b_i| in any summation
    order, blocked or with FMA, so it holds for every BLAS kernel on every CPU and thread count."""
    return n * U32 / (1 - n * U32)


class GatedByHand(NamedTuple):
    pi: torch.Tensor
    """[N, d_sae] exact gate pre-activation x'W_enc + b_gate (float64 of the float32 inputs)."""
    pi_err: torch.Tensor
    """[N, d_sae] how far a float32 evaluation of pi may be from it."""
    magnitude: torch.Tensor
    """[N, d_sae] exact open-gate value relu(x'(W_enc ⊙ exp r_mag) + b_mag)."""
    magnitude_err: torch.Tensor
    """[N, d_sae] how far a float32 evaluation of the magnitude may be from it."""

    @property
    def acts(self) -> torch.Tensor:
        """[N, d_sae] exact activations [pi > 0] · magnitude."""
        return (self.pi > 0).double() * self.magnitude


def gated_acts_by_hand(folder: Path, x: torch.Tensor) -> GatedByHand:
    """The gated encoder in float64 from the raw tensors, with float32 rounding bounds.

    x' = x − b_dec costs one rounding, the n-term dot product γ_n, adding b_gate one more: the
    float32 gate pre-activation is within γ_{n+2} Σ_i |x'_i W_ij| (+ |b_gate_j| u) of the exact one,
    and its sign (the gate) can only differ where |pi| is inside that bound. The magnitude path
    adds exp (≤ 1 ulp = 2u, torch's vectorised expf), one product and the b_mag sum: γ_{n+6}."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.double() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    n = x.shape[-1]
    xin = x.double() - w["b_dec"] if cfg["apply_b_dec_to_input"] else x.double()
    proj = xin @ w["W_enc"]
    mass = xin.abs() @ w["W_enc"].abs()  # Σ_i |x'_i W_ij|
    scale = torch.exp(w["r_mag"])
    pi = proj + w["b_gate"]
    pi_err = gamma(n + 2) * (mass + w["b_gate"].abs())
    magnitude = torch.relu(proj * scale + w["b_mag"])
    magnitude_err = gamma(n + 6) * (mass * scale + w["b_mag"].abs())
    return GatedByHand(pi, pi_err, magnitude, magnitude_err)


def decode_by_hand(folder: Path, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a W_dec + b_dec in float64, its float32 rounding bound γ_{m+1}(|a||W_dec| + |b_dec|))."""
    w = {k: v.double() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    a = a.double()
    err = gamma(a.shape[-1] + 1) * (a.abs() @ w["W_dec"].abs() + w["b_dec"].abs())
    return a @ w["W_dec"] + w["b_dec"], err


def encoder_disagreements(ours: torch.Tensor, hand: GatedByHand) -> torch.Tensor:
    """[N, d_sae] True where a float32 encoder's output cannot be a rounding of the exact one.

    Away from the gate threshold (|pi| beyond its rounding bound) the activation must match
    within the magnitude bound (relu is 1-Lipschitz). Near it the gate may go either way: the
    activation must then be 0 or the open-gate value."""
    ours = ours.double()
    near = hand.pi.abs() <= hand.pi_err
    agrees = (ours - hand.acts).abs() <= hand.magnitude_err
    either = (ours == 0) | ((ours - hand.magnitude).abs() <= hand.magnitude_err)
    return torch.where(near, ~either, ~agrees)


def check_acts(lm, check: dict, sites) -> tuple[dict, torch.Tensor]:
    (task,) = resolve_tasks(check["task"])
    prompts = sample_prompts(task.pairs, n_prompts=check["n_prompts"], n_shot=check["n_shot"], seed=check["seed"])
    batch = encode_prompts(lm.tokenizer, prompts)
    keep = batch.attention_mask.bool() & (batch.input_ids != lm.tokenizer.bos_token_id)
    acts = HookedModel(lm.model).run(batch.input_ids, batch.attention_mask, read=set(sites)).acts
    return acts, keep


def io_sites(kind: str, layer: int) -> tuple[Site, Site]:
    if kind == "transcoder":
        return Site("mlp_in", layer), Site("mlp_out", layer)
    s = Site({"resid": "resid_pre", "attn": "attn_out"}[kind], layer)
    return s, s


def fvu(t: torch.Tensor, t_hat: torch.Tensor) -> float:
    t, t_hat = t.double(), t_hat.double()
    return float(((t - t_hat) ** 2).sum() / ((t - t.mean(0)) ** 2).sum())


# ---- the bundled suite -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_lm():
    from icl_cli.core.models import load_model

    return load_model("toy-icl", device="cpu")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((BUNDLE / "manifest.json").read_text())


def test_bundle_covers_every_layer_and_kind_in_float16(manifest, toy_lm):
    got = {(e["kind"], e["layer"]) for e in manifest["dictionaries"]}
    assert got == {(k, layer) for k in KINDS for layer in range(toy_lm.n_layers)}  # 6 layers × 3 = 18
    for e in manifest["dictionaries"]:
        tensors = load_file(str(BUNDLE / e["folder"] / "sae_weights.safetensors"))
        assert {t.dtype for t in tensors.values()} == {torch.float16}
        for key in ("l0", "fvu", "ce_recovered", "check_fvu", "dead_fraction"):
            assert isinstance(e[key], float), (e["folder"], key)
    assert manifest["model"] == "toy-icl"


def test_bundle_loads_and_gives_the_recorded_fvu(tmp_path, manifest, toy_lm):
    from icl_cli.store import Store

    store = Store(tmp_path / "store")
    suite = load_suite("toy-icl-suite", store)
    assert len(suite) == 18 and suite.key is not None
    # first use imported every dictionary under a content key; the suite artifact ties them together
    art = store.resolve(suite.key)
    assert art.step == "suite" and sorted(art.inputs.values()) == sorted(suite.member_keys.values())
    assert load_suite("toy-icl-suite", store).key == suite.key  # second use reuses the import

    sites = {s for e in manifest["dictionaries"] for s in io_sites(e["kind"], e["layer"])}
    acts, keep = check_acts(toy_lm, manifest["check"], sites)
    for e in manifest["dictionaries"]:
        s_in, s_out = io_sites(e["kind"], e["layer"])
        x, t = acts[s_in][keep].float(), acts[s_out][keep].float()
        folder = BUNDLE / e["folder"]
        ours = suite[(e["kind"], e["layer"])]
        assert ours.W_enc.dtype == torch.float32  # the rounding bounds below are float32's
        # float32 vs float64: only a gate within rounding of its threshold may go either way
        hand = gated_acts_by_hand(folder, x)
        with torch.no_grad():
            a = ours.encode(x)
            x_hat = ours.decode(a)
        assert not encoder_disagreements(a, hand).any(), e["folder"]
        assert (hand.pi.abs() <= hand.pi_err).double().mean() < 0.05  # the bound is not vacuous
        want, err = decode_by_hand(folder, a)
        assert ((x_hat.double() - want).abs() <= err).all(), e["folder"]
        got = fvu(t, gated_by_hand(folder, x))
        assert got == pytest.approx(e["check_fvu"], rel=1e-3, abs=1e-5), e["folder"]
        # (check_fvu is not compared with the training FVU: the check prompts are one task's
        # few-shot prompts, a narrower distribution than training's held-out tokens; on the shipped
        # transcoders the two differ by up to 4x with float32 and float16 weights alike)


def test_the_rounding_bounds_still_catch_a_slightly_wrong_dictionary(manifest, toy_lm):
    """The float32 bounds leave no room for a real error: a 1% change of one encoder weight, a gate
    bias off by 1e-4 or a decoder bias off by 1e-3 is caught, while the intact dictionary passes."""
    from icl_cli.dictionaries import load_dictionary

    site = Site("resid_pre", 0)
    acts, keep = check_acts(toy_lm, manifest["check"], {site})
    x = acts[site][keep].float()
    folder = BUNDLE / "resid.0"
    hand = gated_acts_by_hand(folder, x)

    def wrong_acts_and_outputs(plant) -> tuple[int, int]:
        d = load_dictionary(folder)
        with torch.no_grad():
            plant(d)
            a = d.encode(x)
            x_hat = d.decode(a)
        want, err = decode_by_hand(folder, a)
        return int(encoder_disagreements(a, hand).sum()), int(((x_hat.double() - want).abs() > err).sum())

    assert wrong_acts_and_outputs(lambda d: None) == (0, 0)
    assert wrong_acts_and_outputs(lambda d: d.W_enc[0, 0].mul_(1.01))[0] > 0
    assert wrong_acts_and_outputs(lambda d: d.b_gate.add_(1e-4))[0] > 0
    assert wrong_acts_and_outputs(lambda d: d.b_dec[0].add_(1e-3))[1] > 0


def test_bundle_loads_in_sae_lens(manifest):
    from icl_cli.dictionaries import load_dictionary

    sae_lens = pytest.importorskip("sae_lens")  # slow import: this is the only test that pays it
    torch.manual_seed(0)
    for e in manifest["dictionaries"]:
        folder = BUNDLE / e["folder"]
        assert sae_lens.SAE.load_from_disk(str(folder)).W_enc.dtype == torch.float16  # as stored
        theirs = sae_lens.SAE.load_from_disk(str(folder), dtype="float32")
        ours = load_dictionary(folder)
        x = torch.randn(64, theirs.cfg.d_in) * 3
        hand = gated_acts_by_hand(folder, x)
        with torch.no_grad():
            a, a_ours = theirs.encode(x), ours.encode(x)
            x_hat, x_hat_ours = theirs.decode(a), ours.decode(a)
        assert a.shape == (64, e["d_sae"]) and (a > 0).any()
        # both are float32 roundings of one float64 encoder (a gate within rounding of its
        # threshold may go either way in each) and of one decoder
        assert not encoder_disagreements(a, hand).any() and not encoder_disagreements(a_ours, hand).any()
        want, err = decode_by_hand(folder, a)
        assert ((x_hat.double() - want).abs() <= err).all() and ((x_hat_ours.double() - want).abs() <= err).all()


# ---- suites from a folder ----------------------------------------------------------------------
def tiny_suite_folder(root: Path, layers=(0, 1), kinds=KINDS, model="tiny") -> Path:
    """A suite folder of random gated dictionaries for the 32-wide tiny model."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for layer in layers:
        for kind in kinds:
            site = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "transcoder"}[kind]
            torch.manual_seed(10 * layer + KINDS.index(kind))
            d = build(DictConfig(d_in=32, d_sae=64, arch="gated", site=site, layer=layer, model=model))
            with torch.no_grad():
                for p in d.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            save_saelens(d, root / f"{kind}.{layer}")
            entries.append({"kind": kind, "layer": layer, "folder": f"{kind}.{layer}"})
    (root / "manifest.json").write_text(json.dumps({"name": "tiny-suite", "model": model, "dictionaries": entries}))
    return root


def test_missing_kind_or_layer_is_a_one_line_error(tmp_path):
    suite = load_suite(str(tiny_suite_folder(tmp_path / "s", kinds=("resid", "transcoder"))))
    assert isinstance(suite, Suite) and suite.key is None and len(suite) == 4
    with pytest.raises(IclError) as err:
        suite[("attn", 1)]
    msg = str(err.value)
    assert "\n" not in msg and "attn" in msg and "layer 1" in msg and "--saes attn:1=" in msg
    with pytest.raises(IclError) as err:
        suite.require(range(6))
    msg = str(err.value)
    assert "\n" not in msg and "resid at layers 2-5 (it has 0,1)" in msg and "attn at layers 0-5 (it has none)" in msg
    suite.require([0, 1], kinds=("resid", "transcoder"))  # present: no error


def test_folder_imports_into_the_store_with_lineage_and_names(tmp_path):
    from icl_cli.store import Store

    folder = tiny_suite_folder(tmp_path / "s")
    store = Store(tmp_path / "store")
    first = import_suite(store, str(folder), name="tiny")
    again = load_suite(str(folder), store)
    assert first.key == again.key and first.member_keys == again.member_keys
    by_name = load_suite("tiny", store)  # the imported suite by its name
    assert by_name.key == first.key and set(by_name) == set(first)
    assert store.resolve("tiny.attn.1").key == first.member_keys[("attn", 1)]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    for k in first:
        member = folder / f"{k[0]}.{k[1]}"
        with torch.no_grad():
            a = by_name[k].encode(x)
            x_hat = by_name[k].decode(a)
        assert not encoder_disagreements(a, gated_acts_by_hand(member, x)).any(), k
        want, err = decode_by_hand(member, a)
        assert ((x_hat.double() - want).abs() <= err).all(), k


def test_bad_suites_are_one_line_errors(tmp_path):
    from icl_cli.store import Store

    store = Store(tmp_path / "store")
    folder = tiny_suite_folder(tmp_path / "s")
    m = json.loads((folder / "manifest.json").read_text())
    m["dictionaries"][0]["folder"] = "nowhere"
    (folder / "manifest.json").write_text(json.dumps(m))
    cases = [(str(folder), "lacks the folder nowhere"),
             (str(tmp_path), "no manifest.json"),
             ("no-such-suite", "no dictionary suite 'no-such-suite'")]
    bad = tiny_suite_folder(tmp_path / "b")
    m = json.loads((bad / "manifest.json").read_text())
    m["dictionaries"][0]["kind"] = "attn"  # a resid SAE listed as attn
    m["dictionaries"][1]["kind"] = "resid"
    (bad / "manifest.json").write_text(json.dumps(m))
    cases.append((str(bad), "holds a resid_pre dictionary of layer 0, but the suite lists it as attn"))
    for ref, text in cases:
        with pytest.raises(IclError) as err:
            load_suite(ref, store)
        assert text in str(err.value) and "\n" not in str(err.value), (ref, str(err.value))


def test_write_suite_records_the_fvu_of_its_float16_weights(tmp_path, tiny_lm):
    from icl_cli.dictionaries.suite_build import write_suite

    src = tiny_suite_folder(tmp_path / "src", layers=(1, 2), model=tiny_lm.name)
    members = [(k, layer, SimpleNamespace(path=src / f"{k}.{layer}", key=f"{k}{layer}" * 8,
                                          metrics={"l0": 3.0, "fvu": 0.5, "ce_recovered": 0.9}))
               for layer in (1, 2) for k in KINDS]
    check = {"task": "antonyms", "n_prompts": 2, "n_shot": 4, "seed": 1}
    out = tmp_path / "out"
    manifest = write_suite(out, members, tiny_lm, name="t", training={"tokens": 1}, check=check)
    assert [(e["kind"], e["layer"]) for e in manifest["dictionaries"]] == [(k, layer) for layer in (1, 2) for k in KINDS]
    sites = {s for _, layer, _ in members for k in KINDS for s in io_sites(k, layer)}
    acts, keep = check_acts(tiny_lm, check, sites)
    for e in manifest["dictionaries"]:
        assert load_file(str(out / e["folder"] / "sae_weights.safetensors"))["W_enc"].dtype == torch.float16
        s_in, s_out = io_sites(e["kind"], e["layer"])
        x, t = acts[s_in][keep].float(), acts[s_out][keep].float()
        assert e["check_fvu"] == pytest.approx(fvu(t, gated_by_hand(out / e["folder"], x)), rel=1e-4)
        assert e["l0"] == 3.0 and e["source_key"] == f"{e['kind']}{e['layer']}" * 8
    suite = load_suite(str(out))
    assert len(suite) == 6 and suite.manifest["dtype"] == "float16"


def test_import_suite_command(tmp_path):
    from typer.testing import CliRunner

    from icl_cli.cli.app import app

    folder = tiny_suite_folder(tmp_path / "my-suite")
    res = CliRunner().invoke(app, ["--store", str(tmp_path / "store"), "--json", "store", "import-suite", str(folder)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["name"] == "tiny-suite" and len(data["dictionaries"]) == 6  # the manifest's name
    assert [(d["kind"], d["layer"]) for d in data["dictionaries"]][:3] == [("resid", 0), ("attn", 0), ("transcoder", 0)]
    assert {d["name"] for d in data["dictionaries"]} >= {"tiny-suite.resid.0", "tiny-suite.transcoder.1"}
    res = CliRunner().invoke(app, ["--store", str(tmp_path / "store"), "store", "import-suite", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "no suite folder" in res.output
