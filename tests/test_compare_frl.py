"""scripts/compare_frl.py: `--method-lrs` runs each method at its own client lr (the best
of a `--lrs` sweep), in run folders apart from the reference lrs' runs."""

from __future__ import annotations

import pytest
from helpers import load_script

from fedsim.config import compose

frl = load_script("compare_frl")


def lr_of(cell) -> list[str]:
    return [o for o in cell.overrides if o.startswith("client.lr=")]


def test_each_named_method_runs_at_its_own_lr_and_the_others_at_the_reference_lr():
    args = frl.parse_args(["--datasets", "mnist1d", "--seeds", "0", "--method-lrs",
                           "FRL topk=0.4", "FedAvg=0.1"])
    cells = frl.build_grid(args).cells()
    by_method = {c.method: c for c in cells if c.value == 0.0}
    # The per-method lr comes after the method's own overrides, so it wins when composed.
    assert lr_of(by_method["FRL topk"]) == ["client.lr=0.4"]
    assert lr_of(by_method["FedAvg"]) == ["client.lr=0.01", "client.lr=0.1"]
    assert compose(list(by_method["FedAvg"].overrides)).client.lr == 0.1
    assert lr_of(by_method["FRL"]) == []  # FRL's client keeps its preset lr
    assert lr_of(by_method["Multi-Krum"]) == ["client.lr=0.01"]
    assert "FedAvg 0.1" in frl.lr_sentence(args.method_lrs)


def test_per_method_lrs_get_run_folders_of_their_own():
    plain = frl.build_grid(frl.parse_args(["--seeds", "0"])).cells()
    tuned = frl.build_grid(frl.parse_args(["--seeds", "0", "--method-lrs", "FRL=0.1"])).cells()
    assert {c.run_dir for c in plain}.isdisjoint(c.run_dir for c in tuned)
    assert frl.lr_sentence({}) == ""


@pytest.mark.parametrize("argv, words", [
    (["--method-lrs", "FedProx=0.1"], "METHOD one of"),
    (["--method-lrs", "FRL"], "not METHOD=LR"),
    (["--method-lrs", "FRL=fast"], "FRL's lr must be a number above 0"),
    (["--method-lrs", "FRL=0"], "FRL's lr must be a number above 0"),
    (["--method-lrs", "FRL=nan"], "FRL's lr must be a number above 0"),
    (["--method-lrs", "FRL=0.1", "FRL=0.4"], "FRL is given twice"),
    (["--methods", "FRL", "FedAvg", "--method-lrs", "Multi-Krum=0.1"], "METHOD one of"),
    (["--fractions", "0", "--lrs", "0.1", "--method-lrs", "FRL=0.1"], "use one of the two"),
])
def test_bad_method_lrs_exit_2_naming_the_option(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        frl.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--method-lrs" in err and words in err
