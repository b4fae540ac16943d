"""The data-free tables of benchmarks/readme_table.py: which rows are one setting, and what the ratio compares."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import readme_table  # noqa: E402


def _row(source, kl, draw, spec=None):
    return {"model": "m", "weight_bits": 4, "source": source, "spec": spec or f"/cache/{source}.npz", "data_seed": draw, "refined_kl": kl}


def _rows():
    gan = [_row("gan", kl, draw, "gan:/cache/gan/mnist") for kl, draw in ((2.0, 1), (2.2, 2), (2.4, 3))]
    gan += [_row("gan", kl, draw, "gan:/cache/gan/mnist-seed1/") for kl, draw in ((3.0, 1), (3.2, 2), (3.4, 3))]
    genie = [_row("genie:seed=0,bns=relative", kl, draw) for kl, draw in ((2.5, 1), (2.6, 2), (2.7, 3))]
    genie += [_row("genie:seed=1,bns=relative", kl, draw) for kl, draw in ((2.8, 1), (2.9, 2), (3.1, 3))]
    return gan + genie + [_row("genie:seed=5,steps=9", 9.0, 1)]


def test_setting_and_seed_split_the_seed_out_of_a_source_name():
    assert readme_table._setting_and_seed("genie:seed=1,bns=relative,steps=800,mixes=3") == ("genie:bns=relative,mixes=3,steps=800", 1)
    # one setting however its runs spelled it (canonical names append the defaults after what was given)
    assert readme_table._setting_and_seed("genie:seed=2,steps=800,bns=relative,mixes=3") == ("genie:bns=relative,mixes=3,steps=800", 2)
    # a Genie name from before bns was spelled out: the absolute loss, then its default
    assert readme_table._setting_and_seed("genie:seed=1,mixes=3") == ("genie:bns=absolute,mixes=3", 1)
    assert readme_table._setting_and_seed("gan:seed=2") == ("gan", 2)
    assert readme_table._setting_and_seed("fractal") == ("fractal", 0)


def test_spread_table_pools_every_seed_and_draw_against_the_gan_pooled_alike():
    lines = readme_table.datafree_spread_table(_rows()).splitlines()[2:]
    assert len(lines) == 2  # gan and genie:bns=relative; the one-seed setting is left out
    gan, genie = (line.split(" | ") for line in lines)
    assert gan[2:4] == ["gan", "2 x 3"] and gan[5] == "0: 2.2, 1: 3.2"
    assert genie[2] == "genie:bns=relative" and genie[5] == "0: 2.6, 1: 2.9"
    assert genie[6] == "2.8" and gan[6] == "2.7"  # the median of the seeds' medians: of 2.6 and 2.9, of 2.2 and 3.2
    assert genie[7].rstrip(" |") == f"{2.75 / 2.7:.2f}, {2.75 / 2.7:.2f}"  # every run: 2.75 against 2.7 (six runs each)


def test_seeds_table_names_a_second_gan_apart_and_compares_with_the_first():
    lines = readme_table.datafree_seeds_table(_rows()).splitlines()[2:]
    data = [line.split(" | ")[2] for line in lines]
    assert data[:2] == ["gan", "gan:seed=1"]
    genie = lines[data.index("genie:seed=0,bns=relative")].split(" | ")
    assert genie[4] == f"{2.6 / 2.2:.2f}"


def test_verdict_table_takes_each_setting_over_its_seeds_against_the_better_rival():
    rows = _rows() + [_row("fractal", kl, draw) for kl, draw in ((2.6, 1), (2.5, 2), (2.9, 3))]
    rows += [_row(f"genie:seed={seed},bns=relative,steps=800,mixes=3" if seed < 2 else "genie:seed=2,steps=800,bns=relative,mixes=3", kl, draw)
             for seed, kls in ((0, (2.0, 2.1, 2.2)), (1, (2.4, 2.5, 2.6)), (2, (2.2, 2.3, 2.4))) for kl, draw in zip(kls, (1, 2, 3))]
    rows += [{"model": "m", "source": f"genie:seed={seed},bns=relative,steps=800,mixes=3", "datafree_seconds": seconds}
             for seed, seconds in ((0, 600.0), (1, 720.0), (2, 0))]  # seed 2's data was cached: no time
    rows += [_row("genie:seed=0,bns=relative,steps=800,mixes=3", 9.0, 1) | {"weight_bits": 8}]  # another width: not counted
    line = readme_table.datafree_verdict_table(rows).splitlines()[2].split(" | ")
    assert line[1] == "-" and line[2] == "2.7 (2)" and line[3] == "2.6 (1)"  # no real-digit rows; GAN over its two seeds
    assert line[4] == "-" and line[5] == "2.3 (3)"  # no default-Genie rows; the best setting's seeds' medians 2.1, 2.5, 2.3
    assert line[6] == f"{2.3 / 2.6:.2f}"  # against fractals here, the better of the two
    assert line[7].rstrip(" |") == "-, 11.0"  # the median of the two recorded times, in minutes
