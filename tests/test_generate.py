"""``melt generate`` and the generation core: greedy == full recompute, seeded sampling, stops,
streaming text, batched == one-by-one, KV bytes per loop count, JSON schemas, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import one_red_line
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core import load_model, load_tokenizer
from melt_core.errors import InvalidArgumentError
from melt_core.inference import GenerationSettings, SamplingSettings, generate_text
from melt_core.inference.text import TextStream, default_stop_token_ids, encode_prompt
from melt_core.models.chunks import chunk_lengths

runner = CliRunner()
PROMPTS = ["The cat sat on the mat and", "Once", "A looped model applies the same layers again and again, so"]
NO_STOP = dict(stop_token_ids=())  # random models hit EOS by chance; most tests want fixed lengths


@pytest.fixture(params=["ouro", "melt"])
def loaded(request, tiny_ckpt, melt_ckpt):
    path = tiny_ckpt if request.param == "ouro" else melt_ckpt
    return load_model(path, dtype="fp32"), load_tokenizer(path), path


def _full_recompute(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Argmax of the last position of a fresh full forward at every step. For MELT the forward
    uses generation's chunking (prompt chunks aligned to its end, then one chunk per token)."""
    seq = torch.tensor([prompt_ids])
    for _ in range(steps):
        kwargs = {}
        if model.config.model_type == "melt":
            kwargs["chunk_size"] = chunk_lengths(len(prompt_ids), model.config.melt.chunk_size, "end") + [1] * (
                seq.shape[1] - len(prompt_ids)
            )
        nxt = model(seq, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq[0, len(prompt_ids) :].tolist()


def test_greedy_is_deterministic_and_equals_full_recompute(loaded):
    model, tok, _ = loaded
    settings = GenerationSettings(max_new_tokens=12, **NO_STOP)
    first = generate_text(model, tok, [PROMPTS[0]], settings).results[0]
    again = generate_text(model, tok, [PROMPTS[0]], settings).results[0]
    assert first.token_ids == again.token_ids and first.text == again.text
    assert first.generated_tokens == 12 and first.finish_reason == "length"
    prompt_ids = encode_prompt(tok, PROMPTS[0], chat=False)
    assert first.token_ids == _full_recompute(model, prompt_ids, 12)


def test_seeded_sampling_is_reproducible(loaded):
    model, tok, _ = loaded

    def sample(seed: int, **kw) -> list[int]:
        sampling = SamplingSettings(temperature=kw.pop("temperature", 1.0), seed=seed, **kw)
        return (
            generate_text(model, tok, [PROMPTS[0]], GenerationSettings(max_new_tokens=16, sampling=sampling, **NO_STOP))
            .results[0]
            .token_ids
        )

    assert sample(7, top_k=50, top_p=0.9) == sample(7, top_k=50, top_p=0.9)
    assert sample(7) != sample(8)  # 16 draws from ~uniform over 384 tokens
    greedy = generate_text(model, tok, [PROMPTS[0]], GenerationSettings(max_new_tokens=16, **NO_STOP))
    assert sample(3, top_k=1) == greedy.results[0].token_ids  # top-1 sampling is greedy


def test_stop_token_ends_the_row(loaded):
    model, tok, _ = loaded
    full = generate_text(model, tok, [PROMPTS[0]], GenerationSettings(max_new_tokens=12, **NO_STOP)).results[0]
    stop_id = full.token_ids[4]
    cut = full.token_ids.index(stop_id)
    out = generate_text(
        model, tok, [PROMPTS[0]], GenerationSettings(max_new_tokens=12, stop_token_ids=(stop_id,))
    ).results[0]
    assert out.finish_reason == "stop_token"
    assert out.generated_tokens == cut + 1  # the stop token counts, but is not text
    assert out.token_ids == full.token_ids[:cut]
    assert out.text == tok.decode(full.token_ids[:cut], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_stop_string_cuts_the_text_and_streams_nothing_after_it(loaded):
    model, tok, _ = loaded
    # seeded sampling: varied text (a random model's greedy text can be one repeated byte)
    settings = dict(max_new_tokens=20, sampling=SamplingSettings(temperature=1.0, seed=0), **NO_STOP)
    full = generate_text(model, tok, [PROMPTS[0]], GenerationSettings(**settings)).results[0]
    start = next(i for i in range(3, len(full.text) - 3) if "\ufffd" not in full.text[i : i + 3])
    stop = full.text[start : start + 3]
    deltas: list[str] = []
    out = generate_text(
        model, tok, [PROMPTS[0]], GenerationSettings(stop=(stop,), **settings), on_text=lambda i, d: deltas.append(d)
    ).results[0]
    assert out.finish_reason == "stop_string"
    assert out.text == full.text[: full.text.find(stop)]
    assert "".join(deltas) == out.text
    assert out.generated_tokens < 20


def test_default_stop_ids_include_eos_and_im_end(loaded):
    model, tok, _ = loaded
    ids = default_stop_token_ids(model, tok)
    assert model.config.eos_token_id in ids and tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_chat_template_wraps_the_prompt(tokenizer):
    ids = encode_prompt(tokenizer, "hi there", chat=True)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"


def test_text_stream_handles_multibyte_pieces_and_stop_strings(tokenizer):
    text = "héllo wörld: 世界 ✓ done"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test needs a character split across tokens"
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == stream.text

    stream = TextStream(tokenizer, stop=["世界", "zzz"])
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == "héllo wörld: " and stream.stopped
    # text that might start a stop string is held back until it cannot
    stream = TextStream(tokenizer, stop=["wörx"])
    released, held_at_some_point = "", False
    for i in ids:
        released += stream.push(i)
        held = max((k for k in range(1, 4) if stream.text.endswith("wörx"[:k])), default=0)
        held_at_some_point |= held > 0
        assert released == stream.text[: len(stream.text) - held]
    assert held_at_some_point
    assert released + stream.finish() == text and not stream.stopped


@pytest.mark.parametrize("kind", ["ouro", "melt"])
def test_batched_equals_each_prompt_alone(kind, tiny_ckpt, melt_ckpt):
    path = tiny_ckpt if kind == "ouro" else melt_ckpt
    model, tok = load_model(path, dtype="fp32"), load_tokenizer(path)
    settings = GenerationSettings(max_new_tokens=10, batch_size=len(PROMPTS), **NO_STOP)
    lengths = [len(encode_prompt(tok, p, False)) for p in PROMPTS]
    assert len(set(lengths)) == 3 and any(n % 4 for n in lengths)  # padding and ragged chunks
    batched = generate_text(model, tok, PROMPTS, settings).results
    for p, result in zip(PROMPTS, batched):
        alone = generate_text(model, tok, [p], settings).results[0]
        assert result.token_ids == alone.token_ids and result.text == alone.text, f"{kind}: {p!r}"


def test_prompts_file_gives_one_json_line_per_prompt_equal_to_alone(melt_ckpt, tmp_path):
    file = tmp_path / "prompts.jsonl"
    file.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n\n")
    result = runner.invoke(
        app,
        [
            "generate",
            str(melt_ckpt),
            "--prompts-file",
            str(file),
            "--max-new-tokens",
            "6",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    for line in lines:
        assert {
            "index",
            "prompt",
            "text",
            "loops",
            "prompt_tokens",
            "generated_tokens",
            "finish_reason",
            "token_ids",
        } <= line.keys()
        alone = runner.invoke(
            app, ["generate", str(melt_ckpt), "--prompt", line["prompt"], "--max-new-tokens", "6", "--json"]
        )
        assert json.loads(alone.stdout)["token_ids"] == line["token_ids"]
    assert "tokens/s" in result.stderr and "KV cache" in result.stderr


def _generate_json(path, *args: str) -> dict:
    result = runner.invoke(
        app, ["generate", str(path), "--prompt", PROMPTS[0], "--max-new-tokens", "5", "--json", *args]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_schema(tiny_ckpt):
    out = _generate_json(tiny_ckpt, "--loops", "3")
    required = {
        "text": str,
        "loops": int,
        "kv_cache_bytes": int,
        "kv_cache_bytes_per_loop": list,
        "decode_tokens_per_s": float,
        "prefill_tokens_per_s": float,
        "prompt_tokens": int,
        "generated_tokens": int,
        "finish_reason": str,
        "peak_memory_bytes": int,
        "peak_memory_kind": str,
        "model_type": str,
        "token_ids": list,
    }
    for key, kind in required.items():
        assert isinstance(out[key], kind), key
    assert out["loops"] == 3 and len(out["kv_cache_bytes_per_loop"]) == 3


def test_kv_cache_bytes_melt_constant_ouro_linear_in_loops(tiny_ckpt, melt_ckpt):
    melt2, melt8 = _generate_json(melt_ckpt, "--loops", "2"), _generate_json(melt_ckpt, "--loops", "8")
    ouro2, ouro8 = _generate_json(tiny_ckpt, "--loops", "2"), _generate_json(tiny_ckpt, "--loops", "8")
    assert melt2["kv_cache_bytes"] == melt8["kv_cache_bytes"] > 0
    assert ouro8["kv_cache_bytes"] == 4 * ouro2["kv_cache_bytes"]
    assert ouro2["kv_cache_bytes"] == 2 * melt2["kv_cache_bytes"]  # same base config: MELT = one Ouro loop
    assert ouro8["kv_cache_bytes_per_loop"] == [ouro8["kv_cache_bytes"] // 8] * 8
    assert melt8["kv_cache_bytes_per_loop"] == [melt8["kv_cache_bytes"]] + [0] * 7
    # exact: positions x layers x (K, V) x kv heads x head dim x fp32
    positions = ouro2["prompt_tokens"] + 5
    assert melt2["kv_cache_bytes"] == positions * 3 * 2 * 2 * 8 * 4


def test_streams_text_to_stdout_and_stats_to_stderr(tiny_ckpt):
    result = runner.invoke(app, ["generate", str(tiny_ckpt), "-p", PROMPTS[0], "--max-new-tokens", "8", "--loops", "2"])
    assert result.exit_code == 0, result.output
    model, tok = load_model(tiny_ckpt), load_tokenizer(tiny_ckpt)
    expected = generate_text(model, tok, [PROMPTS[0]], GenerationSettings(max_new_tokens=8, loops=2)).results[0]
    assert result.stdout == expected.text + "\n"
    for needle in ("prompt tokens:", "prefill:", "decode:", "tokens/s", "KV cache:", "2 loops x", "peak memory:"):
        assert needle in result.stderr


def test_stdin_and_prompt_file_and_chat(tiny_ckpt, tmp_path):
    via_stdin = runner.invoke(app, ["generate", str(tiny_ckpt), "--max-new-tokens", "4", "--json"], input=PROMPTS[1])
    file = tmp_path / "p.txt"
    file.write_text(PROMPTS[1])
    via_file = runner.invoke(
        app, ["generate", str(tiny_ckpt), "--prompt-file", str(file), "--max-new-tokens", "4", "--json"]
    )
    assert json.loads(via_stdin.stdout)["token_ids"] == json.loads(via_file.stdout)["token_ids"]
    chat = runner.invoke(
        app, ["generate", str(tiny_ckpt), "--chat", "-p", PROMPTS[1], "--max-new-tokens", "4", "--json"]
    )
    assert json.loads(chat.stdout)["prompt_tokens"] > json.loads(via_file.stdout)["prompt_tokens"]


def test_exit_options_reach_the_model(tiny_ckpt):
    model, tok = load_model(tiny_ckpt), load_tokenizer(tiny_ckpt)
    at0 = generate_text(model, tok, [PROMPTS[0]], GenerationSettings(max_new_tokens=6, exit_at_step=0, **NO_STOP))
    seq = torch.tensor([encode_prompt(tok, PROMPTS[0], False)])
    expected = []
    for _ in range(6):
        nxt = model(seq, exit_at_step=0).logits[:, -1].argmax(-1, keepdim=True)
        expected.append(int(nxt))
        seq = torch.cat([seq, nxt], 1)
    assert at0.results[0].token_ids == expected
    with pytest.raises(InvalidArgumentError, match="exit-at-step must be in"):
        generate_text(model, tok, [PROMPTS[0]], GenerationSettings(exit_at_step=4))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--loops", "0"], "loops must be >= 1"),
        (["--prompt", "   "], "empty"),
        ([], "empty"),  # stdin is empty
        (["--prompt", "hi", "--device", "cuda"], "not available"),
        (["--prompt", "hi", "--device", "tpu"], "unknown device"),
        (["--prompt", "hi", "--prompts-file", "x.jsonl"], "exclude each other"),
        (["--prompt", "hi", "--exit-at-step", "1", "--exit-threshold", "0.5"], "exclude each other"),
        (["--prompt", "hi", "--exit-at-step", "4"], "exit-at-step must be in [0, 3]"),
        (["--prompt", "hi", "--top-p", "0.9"], "temperature > 0"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens must be >= 1"),
        (["--prompt-file", "missing.txt"], "does not exist"),
        (["--prompt", "hi", "--decode", "graph"], "needs a CUDA device"),
        (["--prompt", "hi", "--decode", "fast"], "unknown decode path 'fast'"),
        (["--prompt", "hi", "--decode", "static", "--kv-dtype", "int4"], "excludes --kv-dtype int8 / int4"),
        (["--prompt", "hi", "--compile", "--decode", "static"], "excludes --decode static"),
    ],
)
def test_cli_errors_are_one_line(tiny_ckpt, args, expected):
    if expected in ("not available", "needs a CUDA device") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_red_line(runner.invoke(app, ["generate", str(tiny_ckpt), *args], input=""))
    assert expected in line


def test_prompt_longer_than_the_model_maximum(tiny_ckpt, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(tiny_ckpt, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 8
    (short / "config.json").write_text(json.dumps(cfg))
    line = one_red_line(runner.invoke(app, ["generate", str(short), "--prompt", PROMPTS[2]]))
    assert "tokens; the model's maximum is 8 (max_position_embeddings)" in line
    # a prompt that fits generates up to the maximum, then stops
    out = runner.invoke(app, ["generate", str(short), "--prompt", "Once", "--max-new-tokens", "50", "--json"])
    data = json.loads(out.stdout)
    assert data["prompt_tokens"] + data["generated_tokens"] <= 8


def test_bad_prompts_file_lines(tiny_ckpt, tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"prompt": "ok"}\nnot json\n')
    assert "bad.jsonl:2: not valid JSON" in one_red_line(
        runner.invoke(app, ["generate", str(tiny_ckpt), "--prompts-file", str(file)])
    )
    file.write_text('{"text": "no prompt key"}\n')
    assert "no string field 'prompt'" in one_red_line(
        runner.invoke(app, ["generate", str(tiny_ckpt), "--prompts-file", str(file)])
    )
