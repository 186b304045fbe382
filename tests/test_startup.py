"""Every command starts quickly (heavy libraries are imported by the commands that use them), importing
melt_core still registers melt's models with transformers, and --help prints help texts as written."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import melt_core
from melt_cli.app import app
from melt_core.checkpoints.builtin import BUILTIN_CHECKPOINTS

# Seconds of imports that no `melt --version` or `melt info` needs: transformers (its modeling and
# generation code above all), accelerate, lm-eval, matplotlib, datasets, melt's transformers classes,
# and torch._dynamo (which the meta device's normal_ imports).
HEAVY = (
    "accelerate",
    "datasets",
    "lm_eval",
    "matplotlib",
    "melt_core.integrations.hf",
    "melt_core.integrations.lm_eval_model",
    "torch._dynamo",
    "transformers",
    "transformers.generation.utils",
    "transformers.modeling_utils",
)
EXAMPLE = str(BUILTIN_CHECKPOINTS["example"])


def _run(code: str) -> str:
    """``code`` run by a fresh interpreter (so that no other test's imports count); its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def _heavy_imported(code: str) -> str:
    return _run(f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))")


def test_importing_the_cli_imports_no_heavy_library():
    assert _heavy_imported("import melt_cli.app") == "[]"


def test_version_and_info_import_no_heavy_library():
    code = (
        "import contextlib, io\n"
        "from melt_cli.app import app\n"
        f"for args in (['--version'], ['info', {EXAMPLE!r}], ['info', {EXAMPLE!r}, '--json']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        app(args, prog_name='melt')"
    )
    assert _heavy_imported(code) == "[]"


@pytest.mark.parametrize(
    "imports",
    [
        "import melt_core\nfrom transformers import AutoConfig, AutoModelForCausalLM",
        # transformers' auto module is imported while modeling_utils is half-imported: registered after it
        "import melt_core\nfrom transformers import PreTrainedModel\n"
        "from transformers import AutoConfig, AutoModelForCausalLM",
        "from transformers import AutoConfig, AutoModelForCausalLM\nimport melt_core",
        "import melt_core.integrations.hf\nfrom transformers import AutoConfig, AutoModelForCausalLM",
    ],
    ids=["melt-first", "modeling-utils-first", "transformers-first", "hf-module"],
)
def test_import_melt_core_registers_with_transformers(imports):
    code = (
        f"{imports}\n"
        f"config = AutoConfig.from_pretrained({EXAMPLE!r})\n"
        f"print(type(config).__name__, AutoModelForCausalLM._model_mapping[type(config)].__name__)"
    )
    assert _run(code) == "OuroHFConfig HFOuroForCausalLM"


def test_melt_core_names_are_imported_on_first_use():
    from melt_core import MeltConfig, load_model
    from melt_core.checkpoints import load_model as from_checkpoints
    from melt_core.models import MeltConfig as from_models

    assert load_model is from_checkpoints and MeltConfig is from_models
    assert melt_core.training.TrainingArgs is not None  # a subpackage, as an attribute
    assert set(melt_core.__all__) <= set(dir(melt_core))
    with pytest.raises(AttributeError):
        melt_core.no_such_name  # noqa: B018


# --- --help prints help texts as written (rich markup would drop their [...]) -------------------------

RENDERED = {
    (): ["[default: $MELT_THREADS,"],
    ("eval",): ["melt[eval]"],
    ("eval", "tasks"): ["melt[eval]"],
    ("pretrain",): ["[default: small]", "[default: 4]"],
}
# What rich leaves where it dropped a [...]: "for torch .", "(needs melt)" is caught by the texts' own words
ARTEFACT = re.compile(r" [.,;:](\s|$)|\(\)")
WORD_WITH_BRACKET = re.compile(r"\S*\\?\[[a-z#/@][^\s\[\]]*\]?")


def _commands(command, path=()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


def _help_texts(command) -> list[str]:
    shown = [p for p in command.params if not getattr(p, "hidden", False)]
    texts = [command.help, command.short_help, command.epilog, *(getattr(p, "help", None) for p in shown)]
    return [t for t in texts if t]


@pytest.mark.parametrize(
    "path", [path for path, _ in _commands(typer.main.get_command(app))], ids=lambda path: " ".join(path) or "melt"
)
def test_help_prints_brackets_as_written(path):
    command = dict(_commands(typer.main.get_command(app)))[path]
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in _help_texts(command):
        for word in WORD_WITH_BRACKET.findall(text):
            assert word.replace("\\[", "[") in result.stdout, f"{word!r} of {text!r}"
    for expected in RENDERED.get(path, []):
        assert expected in result.stdout
    assert not ARTEFACT.search(result.stdout), ARTEFACT.search(result.stdout)
