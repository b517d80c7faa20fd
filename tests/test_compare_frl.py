"""scripts/compare_frl.py: `--method-lrs` runs each method at its own client lr (the best
of a `--lrs` sweep), in run folders apart from the reference lrs' runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_script

from fedsim.comparison import Cell
from fedsim.config import compose

frl = load_script("compare_frl")


def unattacked(argv: list[str]) -> dict[str, Cell]:
    """The grid's cells at 0% malicious, seed 0, on MNIST-1D, by method."""
    args = frl.parse_args(["--datasets", "mnist1d", "--seeds", "0", *argv])
    return {c.method: c for c in frl.build_grid(args).cells() if c.value == 0.0}


def lr_of(cell: Cell) -> float:
    return compose(list(cell.overrides)).client.lr


def test_a_named_method_runs_at_its_own_lr_over_its_clients_preset_lr():
    cells = unattacked(["--method-lrs", "FRL topk=0.2", "FedAvg=0.1"])
    assert lr_of(cells["FRL topk"]) == 0.2  # client=frl's preset is 0.4
    assert lr_of(cells["FedAvg"]) == 0.1  # the reference's baseline client says 0.01
    assert lr_of(cells["FRL"]) == 0.4
    assert lr_of(cells["Multi-Krum"]) == 0.01


def test_set_reaches_every_method_over_its_own_client():
    cells = unattacked(["--set", "client.lr=0.2", "model.channels=50"])
    assert {lr_of(cell) for cell in cells.values()} == {0.2}
    assert compose(list(cells["FedAvg"].overrides)).model.channels == 50


def test_per_method_lrs_get_a_run_folder_named_by_them():
    plain = unattacked([])["FRL topk"].run_dir
    tuned = unattacked(["--method-lrs", "FRL topk=0.4", "FedAvg=0.1"])["FRL topk"].run_dir
    swapped = unattacked(["--method-lrs", "FedAvg=0.1", "FRL topk=0.4"])["FRL topk"].run_dir
    other = unattacked(["--method-lrs", "FRL topk=0.2", "FedAvg=0.1"])["FRL topk"].run_dir
    assert plain.parts[-5] == "rounds300"
    assert tuned.parts[-5] == "rounds300_lr-FRL-topk-0.4_lr-FedAvg-0.1"
    assert swapped == tuned != other
    assert tuned.parts[-4:] == Path("mnist1d/FRL-topk/0.0/seed0").parts


def test_the_page_names_each_methods_lr_in_grid_order():
    methods = list(frl.METHODS)
    assert frl.lr_sentence({}, methods) == ""
    assert frl.lr_sentence({"FedAvg": 0.1, "FRL": 0.1}, methods) == (
        " Here the client lrs are set per method (`--method-lrs`; each the base of the "
        "0.999-a-round decay): FRL 0.1, FedAvg 0.1; FRL topk, Trimmed mean, Multi-Krum keep "
        "the reference's.")
    assert frl.lr_sentence({"FRL": 0.1}, ["FRL", "FedAvg"]).endswith(
        "FRL 0.1; FedAvg keeps the reference's.")


@pytest.mark.parametrize("argv, words", [
    (["--method-lrs", "FedProx=0.1"], "'FedProx' is not one of --methods"),
    (["--method-lrs", "FRL"], "'FRL' is not METHOD=LR"),
    (["--method-lrs", "FRL=fast"], "FRL's lr must be a number above 0"),
    (["--method-lrs", "FRL=0"], "FRL's lr must be a number above 0"),
    (["--method-lrs", "FRL=nan"], "FRL's lr must be a number above 0"),
    (["--method-lrs", "FRL=0.1", "FRL=0.4"], "FRL is given twice"),
    (["--methods", "FRL", "FedAvg", "--method-lrs", "Multi-Krum=0.1"],
     "'Multi-Krum' is not one of --methods ('FRL', 'FedAvg')"),
    (["--lrs", "0.1", "--method-lrs", "FRL=0.1"], "use one of the two"),
    (["--fractions", "0", "--lrs", "0.1", "--set", "client.lr=0.1"],
     "use --lrs (a grid) or --method-lrs"),
    (["--method-lrs", "FRL=0.1", "--set", "client.lr=0.1"], "use --lrs (a grid) or --method-lrs"),
])
def test_bad_lrs_exit_2_naming_the_option(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        frl.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err
