"""``melt profile memory`` / ``melt profile speed``: Table 2 from the presets, the measured per-loop
view, the Ouro/MELT pairing, JSON schemas, plots and errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from cli_helpers import one_red_line
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core import load_model
from melt_core.checkpoints.convert import convert_ouro_to_melt, melt_from_ouro
from melt_core.errors import MissingDependencyError
from melt_core.profiling import MemoryProfileArgs, load_pair, measure_generation, memory_profile
from melt_core.profiling.measure import MeasuredRun

runner = CliRunner()


def _by_model(report, loops: int, seq_len: int) -> dict:
    return {e.model: e for e in report.entries if e.seq_len == seq_len and (e.loops == loops or e.model == "plain")}


@pytest.mark.parametrize("preset", ["ouro-1.4b", "melt-1.6b", "OURO-1.4B"])
def test_table_2_from_the_presets(preset):
    """MELT paper Table 2, 32,000 tokens, bf16: KV 25.17 GB vs 6.29 GB; weights 2.869 vs 3.272 GB."""
    report = memory_profile(MemoryProfileArgs(preset=preset, loops=[4], seq_lens=[32000], dtype="bf16"))
    rows = _by_model(report, 4, 32000)
    assert round(rows["ouro"].kv_cache_bytes / 1e9, 2) == 25.17
    assert round(rows["melt"].kv_cache_bytes / 1e9, 2) == 6.29
    assert round(rows["ouro"].weights_bytes / 1e9, 3) == 2.869
    assert round(rows["melt"].weights_bytes / 1e9, 3) == 3.272
    assert rows["ouro"].kv_cache_bytes == 786_432 * 32000
    assert rows["melt"].gate_parameters == 201_375_744 and rows["ouro"].parameters == 1_434_652_673
    assert rows["plain"].kv_cache_bytes == rows["melt"].kv_cache_bytes
    assert rows["ouro"].name == "Ouro-1.4B" and rows["melt"].name == "MELT-1.6B"


def test_ouro_2_6b_and_loop_scaling():
    report = memory_profile(MemoryProfileArgs(preset="ouro-2.6b", loops=[1, 2, 4, 8, 16], seq_lens=[4096]))
    ouro = {e.loops: e for e in report.entries if e.model == "ouro"}
    melt = {e.loops: e for e in report.entries if e.model == "melt"}
    assert melt[1].gate_parameters == 402_751_488 and ouro[1].parameters == 2_667_974_657
    for t in (1, 2, 4, 8, 16):
        assert ouro[t].kv_cache_bytes == t * ouro[1].kv_cache_bytes
        assert melt[t].kv_cache_bytes == ouro[1].kv_cache_bytes
        assert ouro[t].kv_cache_bytes_per_loop == [ouro[1].kv_cache_bytes] * t
        assert melt[t].kv_cache_bytes_per_loop == [melt[t].kv_cache_bytes] + [0] * (t - 1)
        assert ouro[t].total_bytes == ouro[t].weights_bytes + ouro[t].kv_cache_bytes


def test_profile_memory_cli_json_and_table():
    result = runner.invoke(
        app, ["profile", "memory", "--preset", "ouro-1.4b", "--loops", "4", "--seq-len", "32000", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"source", "dtype", "batch", "kv_bytes_per_token", "entries"} <= data.keys()
    entry_keys = {
        "model",
        "name",
        "loops",
        "seq_len",
        "batch",
        "parameters",
        "gate_parameters",
        "weights_bytes",
        "gate_bytes",
        "kv_cache_bytes",
        "kv_cache_bytes_per_loop",
        "total_bytes",
        "measured",
    }
    assert all(entry_keys <= e.keys() for e in data["entries"])
    ouro = next(e for e in data["entries"] if e["model"] == "ouro")
    assert ouro["kv_cache_bytes"] == 25_165_824_000
    table = runner.invoke(app, ["profile", "memory", "--preset", "ouro-1.4b", "--loops", "4", "--seq-len", "32000"])
    assert table.exit_code == 0
    for needle in ("25.17 GB", "6.291 GB", "2.869 GB", "3.272 GB", "GiB", "MELT-1.6B"):
        assert needle in table.stdout


def test_measured_per_loop_view(tiny_ckpt):
    """After each loop of a decode step: Ouro has written one more layer stack of rows, MELT none."""
    pair = load_pair(tiny_ckpt, dtype="fp32")
    cfg = pair.ouro.config
    N, row = cfg.num_hidden_layers, 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    seq = 10
    ouro = measure_generation(pair.ouro, loops=4, seq_len=seq, decode_tokens=2)
    melt = measure_generation(pair.melt, loops=4, seq_len=seq, decode_tokens=2)
    assert ouro.cache_bytes == cfg.kv_bytes_per_token(torch.float32, 4) * seq
    assert melt.cache_bytes == pair.melt.config.kv_bytes_per_token(torch.float32) * seq
    assert len(ouro.in_use_bytes_after_loop) == len(melt.in_use_bytes_after_loop) == 4
    # Ouro: earlier tokens fill all 4 loops' slots; the last token adds N rows per loop
    assert ouro.in_use_bytes_after_loop == [(4 * N * (seq - 1) + N * t) * row for t in (1, 2, 3, 4)]
    assert ouro.in_use_bytes_after_loop[-1] == ouro.cache_bytes
    # MELT: the last token's N rows appear at loop 1; later loops overwrite them
    assert melt.in_use_bytes_after_loop == [N * seq * row] * 4 == [melt.cache_bytes] * 4
    assert ouro.decode_tokens_per_s > 0 and melt.prefill_tokens_per_s > 0


def test_measure_cli_json(melt_ckpt):
    result = runner.invoke(
        app,
        [
            "profile",
            "memory",
            str(melt_ckpt),
            "--measure",
            "--loops",
            "1,3",
            "--seq-len",
            "12",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)["entries"]
    measured = [e for e in entries if e["measured"] is not None]
    assert {(e["model"], e["loops"]) for e in measured} == {("ouro", 1), ("ouro", 3), ("melt", 1), ("melt", 3)}
    for e in measured:
        m = e["measured"]
        assert m["cache_bytes"] == e["kv_cache_bytes"]  # measured == analytic, exactly
        assert {
            "in_use_bytes_after_loop",
            "peak_delta_bytes",
            "held_delta_bytes",
            "memory_kind",
            "decode_tokens_per_s",
            "prefill_tokens_per_s",
        } <= m.keys()
    table = runner.invoke(
        app, ["profile", "memory", str(melt_ckpt), "--measure", "--loops", "2", "--seq-len", "8", "--dtype", "fp32"]
    )
    assert table.exit_code == 0, table.output
    assert "per later loop" in table.stdout and "peak above baseline" in table.stdout


def test_load_pair_from_melt_uses_its_source_and_from_ouro_converts(tiny_ckpt, melt_ckpt):
    pair = load_pair(melt_ckpt)
    assert pair.ouro_source == str(tiny_ckpt.resolve()) and pair.melt_source == str(melt_ckpt)
    converted = load_pair(tiny_ckpt)
    assert "in-memory conversion" in converted.melt_source
    assert converted.melt.model.embed_tokens.weight.data_ptr() == converted.ouro.model.embed_tokens.weight.data_ptr()


def test_melt_from_ouro_equals_the_converted_checkpoint(tiny_ckpt, tmp_path):
    in_memory = melt_from_ouro(load_model(tiny_ckpt))
    on_disk = load_model(convert_ouro_to_melt(tiny_ckpt, tmp_path / "melt"))
    for (name, a), (_, b) in zip(sorted(in_memory.state_dict().items()), sorted(on_disk.state_dict().items())):
        assert torch.equal(a, b), name
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(in_memory(ids, chunk_size=4).logits, on_disk(ids, chunk_size=4).logits)


def test_profile_speed_json(tiny_ckpt):
    result = runner.invoke(
        app,
        ["profile", "speed", str(tiny_ckpt), "--loops", "1,2", "--prompt-tokens", "16", "--new-tokens", "4", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["loops"] for r in data["rows"]] == [1, 2]
    for r in data["rows"]:
        assert r["prefill_ratio"] > 0 and r["decode_ratio"] > 0
        assert r["ouro"]["decode_tokens_per_s"] > 0 and r["melt"]["prefill_tokens_per_s"] > 0
        assert r["ouro"]["decode_tokens"] == 4 and r["melt"]["prefill_tokens"] == 16
    assert data["rows"][1]["ouro"]["cache_bytes"] == 2 * data["rows"][1]["melt"]["cache_bytes"]
    table = runner.invoke(
        app, ["profile", "speed", str(tiny_ckpt), "--loops", "1", "--prompt-tokens", "8", "--new-tokens", "2"]
    )
    assert table.exit_code == 0 and "MELT/Ouro" in table.stdout and "tokens/s" in table.stdout
    assert "rounds must be >= 1" in one_red_line(
        runner.invoke(app, ["profile", "speed", str(tiny_ckpt), "--rounds", "0"])
    )


def test_profile_speed_kv_dtype_and_floor(tiny_ckpt):
    """--kv-dtype int8 decodes from int8 rows; every row reports its floor (the bytes a decode step
    reads over the measured copy bandwidth) and the decode path."""
    args = ["profile", "speed", str(tiny_ckpt), "--loops", "2", "--prompt-tokens", "8", "--new-tokens", "3"]
    result = runner.invoke(app, [*args, "--kv-dtype", "int8", "--kv-group-size", "4", "--rounds", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["decode_path"] == "eager" and data["kv_dtype"] == "int8" and data["bandwidth_bytes_per_s"] > 0
    assert data["startup_seconds"] == {"ouro": 0.0, "melt": 0.0}
    row = data["rows"][0]
    fp32 = json.loads(runner.invoke(app, [*args, "--rounds", "1", "--json"]).stdout)["rows"][0]
    assert row["ouro"]["cache_bytes"] < fp32["ouro"]["cache_bytes"] / 2  # int8 rows and their scales
    for name in ("ouro", "melt"):
        assert 0 < row[f"{name}_floor_bytes"] < fp32[f"{name}_floor_bytes"]  # int8 rows read fewer bytes
        assert row[f"{name}_x_floor"] > 0
        assert row[f"{name}_floor_seconds"] == pytest.approx(row[f"{name}_floor_bytes"] / data["bandwidth_bytes_per_s"])
        assert row[name]["decode_path"] == "eager"
    assert "excludes int8 / int4 rows" in one_red_line(runner.invoke(app, [*args, "--compile", "--kv-dtype", "int8"]))
    # the fixed-shape step without compilation: no start-up to speak of, the path in the report
    static = json.loads(runner.invoke(app, [*args, "--decode", "static", "--rounds", "1", "--json"]).stdout)
    assert static["decode_path"] == "static" and static["rows"][0]["melt"]["decode_tokens_per_s"] > 0
    assert "excludes --decode eager" in one_red_line(runner.invoke(app, [*args, "--compile", "--decode", "eager"]))


def test_decode_step_bytes():
    """The floor's bytes: weights (layers x loops, the rest once, an embedding row per sequence) + KV."""
    from melt_core.cache.quantized import kv_format
    from melt_core.checkpoints import build_model
    from melt_core.models import OuroConfig
    from melt_core.profiling.speed import decode_step_bytes

    config = OuroConfig(
        vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, total_ut_steps=2,
    )  # fmt: skip
    model = build_model(config, dtype=torch.float32)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    rest = 8 + 8 + 1 + 100 * 8  # final norm, exit gate (weight, bias), lm_head
    kv = 2 * 2 * 1 * 4  # K and V of one head of 4 channels, 2 layers, per loop
    expected = 4 * (2 * 2 * layer + rest + 2 * 8 + 10 * 2 * kv * 2)
    assert decode_step_bytes(model, 2, batch=2, positions=10, kv=kv_format("auto")) == expected


@pytest.mark.slow
def test_profile_speed_compiled(tiny_ckpt):
    """--compile: the compiled step decodes; its start-up is compiled before the timed rounds, once
    per model and shape: the second loop count reuses the compiled block (compile time does not grow
    with loops)."""
    result = runner.invoke(
        app,
        ["profile", "speed", str(tiny_ckpt), "--loops", "1,3", "--prompt-tokens", "8", "--new-tokens", "3"]
        + ["--rounds", "1", "--compile", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["decode_path"] == "compiled"
    first, second = data["rows"]
    for name in ("ouro", "melt"):
        assert first[name]["decode_path"] == "compiled" and first[name]["decode_tokens_per_s"] > 0
        assert first[name]["startup_seconds"] > 10 * second[name]["startup_seconds"]
        assert data["startup_seconds"][name] == first[name]["startup_seconds"] + second[name]["startup_seconds"]


def test_speed_rounds_report_the_median_round():
    from melt_core.profiling.speed import _median_run

    runs = [MeasuredRun("ouro", 1, 8, 1, 6, 2, None, 0, [], 0, 0, 0, "rss", p, d) for p, d in ((3, 9), (1, 5), (2, 7))]
    median = _median_run(runs)
    assert (median.prefill_seconds, median.decode_seconds) == (2, 7)


def test_plot_memory(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "memory.png"
    result = runner.invoke(
        app,
        [
            "profile",
            "memory",
            "--preset",
            "ouro-1.4b",
            "--loops",
            "1,2,4,8,16",
            "--seq-len",
            "4096,32000",
            "--plot",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_memory_tells_every_line_apart(tmp_path, monkeypatch):
    """A log y axis; every legend entry names its sequence length in tokens and has a style (colour,
    line style, marker) of its own: the plain and reference lines at 4,096 and 32,000 tokens too."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from melt_cli.plots import plot_memory

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    report = memory_profile(MemoryProfileArgs(preset="ouro-1.4b", loops=(1, 2, 4, 8, 16), seq_lens=(4096, 32000)))
    plot_memory(report, tmp_path / "m.png")
    (ax,) = figures[0].axes
    assert ax.get_yscale() == "log"
    handles, labels = ax.get_legend_handles_labels()
    assert len(labels) == 8 and all(label.endswith((" 4,096 tokens", " 32,000 tokens")) for label in labels)
    styles = {(h.get_color(), h.get_linestyle(), h.get_marker()) for h in handles}
    assert len(styles) == len(handles)
    close(figures[0])


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    from melt_cli.plots import plot_memory

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report = memory_profile(MemoryProfileArgs(preset="ouro-1.4b", loops=[1], seq_lens=[16]))
    with pytest.raises(MissingDependencyError, match=r"pip install 'melt\[plot\]'"):
        plot_memory(report, tmp_path / "x.png")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["memory", "--preset", "ouro-9b"], "unknown preset 'ouro-9b'; choose from ouro-1.4b, ouro-2.6b"),
        (["memory"], "exactly one"),
        (["memory", "--preset", "ouro-1.4b", "--loops", "0,4"], "loops must be >= 1"),
        (["memory", "--preset", "ouro-1.4b", "--loops", "1,x"], "comma-separated integers"),
        (["memory", "--preset", "ouro-1.4b", "--seq-len", "70000"], "exceeds the model's maximum 65536"),
        (["memory", "--preset", "ouro-1.4b", "--measure"], "needs a checkpoint"),
        (["memory", "--preset", "ouro-1.4b", "--dtype", "int8"], "unknown dtype"),
    ],
)
def test_profile_errors_are_one_line(args, expected):
    assert expected in one_red_line(runner.invoke(app, ["profile", *args]))


def test_speed_on_melt_without_source_is_a_clear_error(melt_ckpt, tmp_path):
    import shutil

    src = tmp_path / "orphan"
    shutil.copytree(melt_ckpt, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["melt"]["source"] = None
    (src / "config.json").write_text(json.dumps(cfg))
    line = one_red_line(runner.invoke(app, ["profile", "speed", str(src), "--loops", "1"]))
    assert "records no Ouro source" in line
    cfg["melt"]["source"] = str(tmp_path / "gone")
    (src / "config.json").write_text(json.dumps(cfg))
    assert "does not exist here" in one_red_line(runner.invoke(app, ["profile", "speed", str(src)]))
    if not torch.cuda.is_available():
        assert "not available" in one_red_line(
            runner.invoke(app, ["profile", "speed", str(melt_ckpt), "--device", "cuda"])
        )
