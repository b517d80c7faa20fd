"""The README quotes only figures that scripts/headline.py measured, for today's defaults."""

import json

from omegaconf import OmegaConf

from fedsim.config import compose
from tests.helpers import load_script

headline = load_script("headline")


def record() -> dict:
    return json.loads(headline.RECORD.read_text())


def test_readme_blocks_are_rendered_from_the_recorded_runs():
    text = headline.README.read_text()
    assert headline.render_readme(text, record()) == text, (
        "README.md differs from docs/results/headline.json: run `python scripts/headline.py "
        "--render` (or the full script after a change that moves the numbers)")


def test_the_recorded_default_run_used_todays_default_config():
    today = OmegaConf.to_container(compose([]), resolve=True)
    assert record()["default"]["config"] == headline.comparable_config(today), (
        "the default config changed since the headline run: rerun `python scripts/headline.py`")


def test_every_preset_has_a_row_and_a_recorded_time_or_a_reason():
    table = headline.README.read_text().split("<!-- presets:begin -->")[1]
    table = table.split("<!-- presets:end -->")[0]
    rows = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert rows == set(headline.preset_names())
    timed = record()["presets"]
    for name in headline.preset_names():
        assert name in timed or name in headline.NOT_TIMED, f"preset {name} was never timed"


def test_render_presets_sets_the_last_cell_only():
    table = "| preset | what | time here |\n|---|---|---|\n| `w1` | W1 | — |\n| `x` | y | old |\n"
    out = headline.render_presets(table, {"presets": {"w1": {"seconds": 125}}})
    assert out.splitlines()[2] == "| `w1` | W1 | 2 min |"
    assert out.splitlines()[3] == "| `x` | y | not timed yet |"
    assert headline.duration(25.4) == "25 s" and headline.duration(1000) == "17 min"
