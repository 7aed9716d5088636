"""The method registry: what a method needs is read from its ``MethodSpec``, nowhere else."""

from __future__ import annotations

import pytest

from rcl_ops.train.config import build_config
from rcl_ops.train.methods import METHODS, MethodSpec, canonical_method, controls_of, variant, variants
from rcl_ops.train.trainer import run_experiment


@pytest.mark.slow
def test_a_registry_entry_is_all_a_method_needs(tmp_path, monkeypatch):
    """An existing objective (noise2noise) under a new name, added by one registry entry and nothing else,
    runs end to end: its data (the second noisy draw) is made, the loop trains it, the report titles it,
    and it scores exactly what the same objective scores under its own name (same seed, same draws)."""
    again = MethodSpec("n2n-again", "N2N again", METHODS["n2n"].objective, second_draw=True)
    monkeypatch.setitem(METHODS, again.name, again)
    config = build_config(
        "quick",
        methods=["n2n-again", "n2n"],
        seeds=[0],
        pretrain_steps=3,
        finetune_steps=2,
        plots=False,
        threads=1,
        output_dir=str(tmp_path),
        run_name="registry",
    )
    summary = run_experiment(config, echo=None)
    runs = {run["method"]: run for run in summary["runs"]}
    assert runs["n2n-again"]["pretrain"]["steps"] == 3
    assert runs["n2n-again"]["pretrain"]["final_loss"] == runs["n2n"]["pretrain"]["final_loss"]
    assert runs["n2n-again"]["tasks"]["denoise"]["psnr_per_image"] == runs["n2n"]["tasks"]["denoise"]["psnr_per_image"]
    assert "N2N again" in [row["title"] for row in summary["rows"]]
    assert (tmp_path / "registry" / "results" / "n2n-again_seed0.json").exists()


def test_variants_expand_encoders_and_the_oracle():
    config = build_config("quick", methods=["rcl", "consistency", "contrast", "oracle", "n2n"], encoders=["random"])
    assert [v.key for v in variants(config)] == [
        "rcl-emd+random",
        "consistency+random",
        "contrast-emd",
        "sl-denoise",
        "n2n",
    ]
    raw = build_config("quick", modality="raw", methods=["rcl-bd", "oracle"], tasks=["jdd", "jdemsr2"])
    assert [v.key for v in variants(raw)] == ["rcl-bd", "sl-jdd", "sl-jdemsr2"]


def test_spec_fields_replace_name_parsing():
    v = variant("rcl-mmd+self")
    assert (v.method.distance, v.encoder, v.method.consistency, v.method.family) == ("mmd", "self", True, "rcl")
    assert v.title == "RCL-MMD (g_e: self-pre-trained)"
    assert variant("contrast-bd").method.distance == "bd" and not variant("contrast-bd").method.consistency
    assert variant("consistency").method.distance is None
    assert variant("sl-sr2").method.task == "sr2" and variant("sl-sr2").title == "SL (SR x2)"
    assert controls_of("rcl-emd+random") == {"consistency": "consistency+random", "contrast": "contrast-emd"}
    assert controls_of("n2n") == {}
    assert canonical_method("SL-denoise", "emd", "raw") == "sl-jdd"
    with pytest.raises(ValueError, match="not defined for --modality raw"):
        canonical_method("moco", "emd", "raw")
    with pytest.raises(ValueError, match="unknown method 'rcl-xyz'"):
        canonical_method("rcl-xyz", "emd")
