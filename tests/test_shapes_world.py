import json
import random

import pytest
from PIL import Image

from trainer.datagen import load_annotations, symbolic_text
from trainer.shapes import COLORS, judge, make_scene, questions, render, write_split
from trainer.shapes.world import inventory, naming_order, position_outcome, swap_shapes


def test_scenes_follow_the_rules_of_the_world():
    rng = random.Random(0)
    for _ in range(300):
        side = rng.choice((224, 336, 500))
        things = make_scene(rng, side)
        assert 1 <= len(things) <= 3 and len({thing.cell for thing in things}) == len(things)
        for thing in things:
            x1, y1, x2, y2 = thing.box
            assert 0.15 * side - 1 <= x2 - x1 <= 0.30 * side + 1
            cell_x, cell_y = (thing.cell % 3) * side // 3, (thing.cell // 3) * side // 3
            assert cell_x <= x1 and x2 <= cell_x + side // 3 + 1 and cell_y <= y1 and y2 <= cell_y + side // 3 + 1


def test_rendered_pixels_match_the_boxes_and_colours():
    rng = random.Random(1)
    for _ in range(50):
        things = make_scene(rng, 336)
        image = render(things, 336)
        for thing in things:
            x1, y1, x2, y2 = thing.box
            centre = image.getpixel(((x1 + x2) // 2, y1 + (y2 - y1) * 3 // 5))  # inside every shape, the triangle too
            assert centre == thing.rgb
            assert max(abs(a - b) for a, b in zip(centre, COLORS[thing.color])) <= 25
        assert image.getpixel((0, 0)) == (255, 255, 255) or any(t.box[0] == 0 and t.box[1] == 0 for t in things)


def test_a_shape_swapped_copy_differs_only_in_shape():
    rng = random.Random(2)
    for _ in range(200):
        things = make_scene(rng, 256)
        twin = swap_shapes(things, rng)
        assert [(t.color, t.cell, t.box, t.rgb) for t in twin] == [(t.color, t.cell, t.box, t.rgb) for t in things]
        assert any(a.shape != b.shape for a, b in zip(things, twin))


def test_the_inventory_names_every_thing_in_reading_order():
    things = [{"shape": "square", "color": "blue", "position": "bottom right"}, {"shape": "circle", "color": "red", "position": "center"},
              {"shape": "triangle", "color": "green", "position": "top"}]
    assert inventory(things) == "a green triangle at the top; a red circle in the center; a blue square at the bottom right."


def test_the_naming_order_is_by_colour_then_shape():
    things = [{"shape": "square", "color": "yellow", "position": "top left"}, {"shape": "triangle", "color": "red", "position": "top"},
              {"shape": "circle", "color": "red", "position": "center"}]
    assert [f"{t['color']} {t['shape']}" for t in naming_order(things)] == ["red circle", "red triangle", "yellow square"]


def test_a_split_is_seeded_and_reads_as_datagen_input(tmp_path):
    path = write_split(tmp_path / "a", "train", 12, seed=3)
    again = write_split(tmp_path / "b", "train", 12, seed=3)
    assert path.read_text() == again.read_text()
    annotations = load_annotations([path])
    record = json.loads(path.read_text().splitlines()[0])
    assert len(annotations) == 12 and Image.open(tmp_path / "a" / "images" / record["image"]).size == (record["width"],) * 2
    text = symbolic_text(annotations[0])
    for thing in record["things"]:
        assert f"{thing['color']} {thing['shape']}: [" in text
    assert all(len(annotation.captions) == 3 for annotation in annotations)


def test_questions_cover_every_kind_with_true_answers():
    things = [{"shape": "circle", "color": "red", "position": "top left"}, {"shape": "square", "color": "blue", "position": "center"}]
    asked = {question: (kind, expected) for kind, question, expected in questions(things, random.Random(0))}
    assert asked["What color is the circle?"] == ("color", "red")
    assert asked["What shape is the blue object?"] == ("shape", "square")
    assert asked["Where is the red circle?"] == ("position", "top left")
    assert asked["How many shapes are in the image?"] == ("count", 2)
    assert asked["Describe the image."] == ("describe", ["red circle", "blue square"])
    yes_no = [expected for kind, expected in asked.values() if kind == "yes/no"]
    assert sorted(yes_no) == ["no", "yes"]


@pytest.mark.parametrize("kind, answer, expected, right", [
    ("color", "The circle is red.", "red", True),
    ("color", "It is red or blue.", "red", False),  # hedging between colours is wrong
    ("shape", "It is a triangle.", "triangle", True),
    ("count", "There are 3 shapes.", 3, True),
    ("count", "There are three shapes.", 3, True),
    ("count", "Two or three.", 3, False),
    ("position", "It is at the top left of the image.", "top left", True),
    ("position", "It is at the top of the image.", "top left", False),
    ("yes/no", "Yes, there is.", "yes", True),
    ("yes/no", "No.", "yes", False),
    ("describe", "A red circle at the top left and a blue square in the center.", ["red circle", "blue square"], True),
    ("describe", "A red circle.", ["red circle", "blue square"], False),
])
def test_judge_reads_the_key_word(kind, answer, expected, right):
    assert judge(kind, answer, expected) is right


@pytest.mark.parametrize("answer, outcome", [
    ("The red circle is at the top left of the image.", "right"),
    ("The red circle is in the center of the image.", "another thing's place"),  # the blue square's place
    ("The red circle is at the bottom of the image.", "an empty cell"),
    ("The red circle is red.", "no place"),
])
def test_position_outcomes_tell_a_wrong_thing_from_an_unread_place(answer, outcome):
    things = [{"shape": "circle", "color": "red", "position": "top left"}, {"shape": "square", "color": "blue", "position": "center"}]
    assert position_outcome(answer, "top left", things) == outcome
    assert (outcome == "right") is judge("position", answer, "top left")
