"""`heterocache bench` on a random-weight model built from a config file (no weights, no download)."""

from __future__ import annotations

import json

import pytest
import torch

from heterocache.bench.measure import measure_decode, prompt_ids
from heterocache.cli import main
from heterocache.engine.registry import make_cache
from heterocache.models import random_model


def test_bench_writes_rows_for_every_cell_and_a_plot(toy_config, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    rc = main(["bench", "--model", f"random:{toy_config}", "--methods", "dynamic,fullkv,snapkv,heterocache",
               "--budgets", "0.1,0.6", "--lengths", "64,256", "--batch-sizes", "1,2", "--new-tokens", "3",
               "--warmup", "1", "--profile", str(toy_config / "toy.safetensors"), "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    rows = result["rows"]
    # 2 lengths x 2 batches x (dynamic, fullkv, 2 x snapkv, 2 x heterocache)
    assert len(rows) == 2 * 2 * 6
    assert result["machine"]["device"] == "cpu" and result["settings"]["weight_bytes_read_per_step"] > 0
    full = [r for r in rows if r["method"] == "fullkv"]
    assert all(r["tokens_equal_dynamic"] for r in full)
    for L in (256,):  # (at 64 tokens, block rounding and the 128-token reserve hide the budget)
        for B in (1, 2):
            kv = {(r["method"], r["budget"]): r["kv_bytes_end"] for r in rows
                  if (r["length"], r["batch"]) == (L, B) and "error" not in r}
            assert kv[("snapkv", 0.1)] < kv[("snapkv", 0.6)] < kv[("fullkv", None)]
    for r in rows:
        if "error" not in r:
            assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["decode_ms_per_token"])
    # budget 0.1 is below the toy profile's 2/12 volatile heads (the floor even with its pivots
    # compressed, as "auto" does there): recorded as infeasible, not a crash
    hetero = {(r["length"], r["batch"], r["budget"]): r for r in rows if r["method"] == "heterocache"}
    assert all("infeasible" in r["error"] for k, r in hetero.items() if k[2] == 0.1)
    assert all(r["refreshes_per_step"] is not None and r["host_bytes_end"] > 0
               for k, r in hetero.items() if k[2] == 0.6)
    assert (out / "bench.png").stat().st_size > 10_000
    assert "| 256 | 2 | snapkv@0.1 |" in capsys.readouterr().out


def test_repeated_rows_decode_like_the_single_row(toy_config):
    model = random_model(str(toy_config))
    ids = prompt_ids(None, 80, vocab_size=256)
    one = measure_decode(model, ids, lambda: make_cache("fullkv"), new_tokens=4, warmup=1)
    three = measure_decode(model, ids, lambda: make_cache("fullkv"), new_tokens=4, warmup=1, replicate=3)
    assert three["batch"] == 3 and three["kv_bytes_end"] == pytest.approx(3 * one["kv_bytes_end"], rel=0.01)
    assert three["tokens"] == one["tokens"] * 3


def test_bad_requests_fail_before_any_work(toy_config, tmp_path, capsys):
    # rejected while parsing (exit 2, the reason on stderr)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", f"random:{toy_config}", "--methods", "nope", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", f"random:{toy_config}", "--budgets", "1.5", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "must be in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the default device: known once torch is imported
        main(["bench", "--model", f"random:{toy_config}", "--max-batch", "128", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "needs --device cuda" in capsys.readouterr().err
    # heterocache without a profile for this model: says how to make one
    with pytest.raises(SystemExit, match="heterocache profile run"):
        main(["bench", "--model", f"random:{toy_config}", "--methods", "heterocache", "--out", str(tmp_path)])


def test_random_model_has_the_published_shape_and_finds_its_profile():
    from heterocache.models import KNOWN_SHAPES

    shape = KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"]
    assert (shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"]) == (32, 8, 128)
    with pytest.raises(ValueError, match="no known shape for 'gpt-9'"):
        random_model("gpt-9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bandwidth_is_measured_on_cuda():
    from heterocache.bench.measure import copy_bandwidth

    assert copy_bandwidth("cuda", 1 << 26) > 1e11


def test_a_method_from_the_user_s_own_file_runs_by_name(toy_config, tmp_path, capsys, monkeypatch):
    """``--methods-from FILE`` imports the file that registers the method (the example's key-norm
    eviction); a name no file registers is still a one-line error, before any model loads."""
    from pathlib import Path

    import heterocache.engine.registry as registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # unregistered after the test
    example = Path(__file__).resolve().parents[2] / "examples" / "custom_method.py"
    out = tmp_path / "bench"
    rc = main(["bench", "--model", f"random:{toy_config}", "--methods-from", str(example), "--methods", "keynorm",
               "--budgets", "0.5", "--lengths", "64", "--batch-sizes", "1", "--new-tokens", "2", "--warmup", "1",
               "--no-plot", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["keynorm"] and "error" not in rows[0]
    with pytest.raises(SystemExit) as err:
        main(["bench", "--model", f"random:{toy_config}", "--methods-from", str(example), "--methods", "keynorn",
              "--out", str(tmp_path / "b2")])
    assert err.value.code == 2
    assert "unknown method 'keynorn'" in capsys.readouterr().err
