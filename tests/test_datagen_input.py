import json

import pytest

from trainer.datagen import AnnotationError, load_annotations, symbolic_text


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


RECORD = {"id": "a", "image": "a.jpg", "width": 640, "height": 480, "captions": ["A dog on a sofa.", "A brown dog."],
          "boxes": [{"label": "dog", "bbox": [64, 48, 320, 240]}, {"label": "couch", "bbox": [0, 200, 640, 480]}]}


def test_symbolic_text_is_captions_then_normalized_boxes(tmp_path):
    (annotation,) = load_annotations([write_jsonl(tmp_path / "a.jsonl", [RECORD])])
    assert symbolic_text(annotation) == (
        "A dog on a sofa.\nA brown dog.\ndog: [0.1, 0.1, 0.5, 0.5]\ncouch: [0.0, 0.417, 1.0, 1.0]"
    )


def test_coco_captions_and_instances_are_joined_per_image(tmp_path):
    images = [{"id": 7, "file_name": "000007.jpg", "width": 200, "height": 100}]
    captions = {"images": images, "annotations": [{"id": 1, "image_id": 7, "caption": "A cat on a mat."},
                                                  {"id": 2, "image_id": 7, "caption": "A sleepy cat."}]}
    instances = {"images": images, "categories": [{"id": 17, "name": "cat"}],
                 "annotations": [{"id": 3, "image_id": 7, "category_id": 17, "bbox": [20, 10, 100, 50]}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (annotation,) = load_annotations([tmp_path / "captions.json", tmp_path / "instances.json"])
    assert (annotation.id, annotation.image) == ("7", "000007.jpg")
    assert symbolic_text(annotation) == "A cat on a mat.\nA sleepy cat.\ncat: [0.1, 0.1, 0.6, 0.6]"  # xywh -> xyxy
    with pytest.raises(AnnotationError, match="captions file, then the instances file"):
        load_annotations([tmp_path / "instances.json", tmp_path / "captions.json"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"width": 0}, "width and height"),
        ({"captions": "one string"}, "captions must be a list"),
        ({"boxes": [{"label": "dog", "bbox": [10, 10, 5, 20]}]}, r"boxes\[0\] \(dog\) has x2 <= x1"),
        ({"boxes": [{"bbox": [1, 2, 3, 4]}]}, r"boxes\[0\] must be"),
        ({"captions": [], "boxes": []}, "no captions and no boxes"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path, change, message):
    path = write_jsonl(tmp_path / "ann.jsonl", [RECORD | {"id": "first"}, RECORD | change])
    with pytest.raises(AnnotationError, match=rf"ann.jsonl:2: {message}"):
        load_annotations([path])


def test_broken_json_and_duplicate_ids_are_errors(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text(json.dumps(RECORD) + "\n{not json\n")
    with pytest.raises(AnnotationError, match="ann.jsonl:2: not valid JSON"):
        load_annotations([path])
    with pytest.raises(AnnotationError, match="id 'a' appears twice"):
        load_annotations([write_jsonl(tmp_path / "dup.jsonl", [RECORD, RECORD])])
