"""The probes on image tokens (trainer/shapes/probe.py): they find a place where the features hold it and report chance
where they do not, and `llava-eval shapes-probe` runs them on a checkpoint."""

import json
import random
from pathlib import Path

import pytest
import torch

from trainer.eval.cli import main as eval_main
from trainer.shapes.probe import probe_features
from trainer.shapes.world import COLORS, GRID, SHAPES, as_dicts, make_scene

MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "shapes-llava"


def scenes_and_codes(count: int):
    rng = random.Random(0)
    scenes = [as_dicts(make_scene(rng, 224)) for _ in range(count)]
    generator = torch.Generator().manual_seed(0)
    content = torch.randn(len(COLORS), len(SHAPES), 48, generator=generator)  # what a thing looks like
    place = torch.randn(len(GRID), 48, generator=generator)
    joint = torch.randn(len(COLORS), len(SHAPES), len(GRID), 48, generator=generator)  # a code per thing-and-place
    return scenes, content, place, joint


def features(scenes, code) -> torch.Tensor:
    out = torch.zeros(len(scenes), len(GRID), 48)
    for index, things in enumerate(scenes):
        for thing in things:
            cell = GRID.index(thing["position"])
            out[index, cell] = code(list(COLORS).index(thing["color"]), SHAPES.index(thing["shape"]), cell)
    return out


def test_a_place_held_only_by_the_token_index_reads_from_no_single_token_nor_the_bag():
    scenes, content, _, _ = scenes_and_codes(600)
    result = probe_features(features(scenes, lambda c, s, cell: content[c, s]), scenes, steps=300)
    assert result["token: color"] > 0.95 and result["token: shape"] > 0.95
    assert result["token: cell"] < 0.3 and result["bag: cell of the asked thing"] < 0.3


def test_a_place_coded_with_the_thing_reads_from_the_bag_and_an_added_one_only_from_the_token():
    scenes, content, place, joint = scenes_and_codes(600)
    added = probe_features(features(scenes, lambda c, s, cell: content[c, s] + place[cell]), scenes, steps=300)
    assert added["token: cell"] > 0.95
    joined = probe_features(features(scenes, lambda c, s, cell: joint[c, s, cell]), scenes, steps=300)
    # An added place tells which cells hold something, not which thing: about 50% (chance among a scene's things).
    assert added["bag: cell of the asked thing"] < 0.65 and joined["bag: cell of the asked thing"] > 0.75


def test_the_asked_things_token_is_matched_where_its_token_holds_it_not_where_every_token_holds_the_whole_scene():
    scenes, content, place, _ = scenes_and_codes(600)
    local = probe_features(features(scenes, lambda c, s, cell: content[c, s] + place[cell]), scenes, steps=300)
    assert local["match: token of the asked thing"] > 0.95
    everywhere = torch.zeros(len(scenes), len(GRID), 48)
    for index, things in enumerate(scenes):
        scene = sum(content[list(COLORS).index(t["color"]), SHAPES.index(t["shape"])] for t in things)
        everywhere[index] = scene + place  # each token: the whole scene, and its own cell
    smeared = probe_features(everywhere, scenes, steps=300)
    assert smeared["match: token of the asked thing"] < 0.4


def test_features_that_are_not_one_token_per_cell_are_refused():
    scenes, *_ = scenes_and_codes(10)
    with pytest.raises(ValueError, match="want \\(10 scenes, 9 tokens"):
        probe_features(torch.zeros(10, 16, 8), scenes)


def test_the_command_probes_the_committed_model(tmp_path, capsys):
    assert eval_main(["shapes-probe", "--model", str(MODEL), "--images", "300", "--output", str(tmp_path)]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert json.loads(capsys.readouterr().out) == scores
    # The committed tower (position embedding started at norm 13): colour and cell in a thing's own token.
    assert scores["token: color"] > 90 and scores["token: cell"] > 90
