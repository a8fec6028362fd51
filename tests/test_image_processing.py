import numpy as np
import pytest
import torch
from PIL import Image

from llava_plugin import ImageLoadError, LlavaPluginImageProcessor, load_image

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def pixels(image, aspect="pad", size=32):
    processor = LlavaPluginImageProcessor(image_aspect=aspect, image_size=size, image_mean=MEAN, image_std=STD)
    return processor(image, return_tensors="pt")["pixel_values"][0]  # (3, size, size)


def unnormalize(values: torch.Tensor) -> torch.Tensor:
    return (values * 0.25 + 0.5) * 255


@pytest.mark.parametrize(
    "image, expected_rgb",
    [
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent -> white, not red or black
        (Image.new("RGBA", (8, 8), (0, 0, 255, 255)), (0, 0, 255)),
        (Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
        (Image.new("L", (8, 8), 100), (100, 100, 100)),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("I;16", (8, 8), 65535), (255, 255, 255)),  # 16-bit white stays white
        (Image.new("I;16", (8, 8), 32768), (128, 128, 128)),  # and mid-grey is scaled, not clipped to 255
        (Image.new("I", (8, 8), 1000), (4, 4, 4)),
    ],
)
def test_every_mode_becomes_the_rgb_a_viewer_shows(image, expected_rgb):
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.getpixel((4, 4)) == expected_rgb


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_grayscale_and_rgba_arrays_are_accepted():
    assert load_image(np.full((8, 8), 7, dtype=np.uint8)).getpixel((0, 0)) == (7, 7, 7)
    assert load_image(np.zeros((8, 8, 4), dtype=np.uint8)).getpixel((0, 0)) == (255, 255, 255)


def test_a_truncated_file_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "broken.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="broken.png"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="broken.png"):
        LlavaPluginImageProcessor(image_size=32)(str(path))


def test_a_non_image_file_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        load_image(str(path))


def test_a_missing_file_is_an_error_that_names_it(tmp_path):
    with pytest.raises(ImageLoadError, match="absent.png"):
        load_image(tmp_path / "absent.png")


def wide_image():
    """64x16: a red left quarter, green middle half, blue right quarter."""
    image = Image.new("RGB", (64, 16), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 16, 16))
    image.paste((0, 0, 255), (48, 0, 64, 16))
    return image


def test_pad_keeps_the_whole_image_and_fills_with_the_mean_colour():
    values = unnormalize(pixels(wide_image(), "pad"))
    mean_colour = torch.tensor([127.0, 127.0, 127.0])  # int(0.5 * 255)
    assert torch.allclose(values[:, 0, 16], mean_colour, atol=1.5)  # top band is padding
    assert torch.allclose(values[:, 31, 16], mean_colour, atol=1.5)
    centre_row = values[:, 16]
    assert centre_row[0, 2] > 200 and centre_row[2, 29] > 200  # red and blue ends survive


def test_crop_keeps_the_centre_only():
    values = unnormalize(pixels(wide_image(), "crop"))
    assert values[1].min() > 200 and values[0].max() < 50  # all green: red and blue were cropped away


def test_resize_stretches_the_whole_image_without_padding():
    values = unnormalize(pixels(wide_image(), "resize"))
    assert values[0, 0, 1] > 200 and values[2, 31, 30] > 200  # red and blue reach the top and bottom rows


@pytest.mark.parametrize("aspect", ["pad", "resize", "crop"])
@pytest.mark.parametrize("size", [(32, 32), (33, 17), (7, 100), (300, 41)])
def test_every_mode_gives_a_square_of_the_tower_size(aspect, size):
    assert pixels(Image.new("RGB", size, (9, 9, 9)), aspect, size=32).shape == (3, 32, 32)


def test_settings_survive_save_and_load(tmp_path):
    LlavaPluginImageProcessor(image_aspect="crop", image_size=48, image_mean=MEAN, image_std=STD).save_pretrained(tmp_path)
    loaded = LlavaPluginImageProcessor.from_pretrained(tmp_path)
    assert (loaded.image_aspect, loaded.image_size, list(loaded.image_mean)) == ("crop", 48, MEAN)
    assert loaded(wide_image(), return_tensors="pt")["pixel_values"].shape == (1, 3, 48, 48)


def test_unknown_aspect_is_refused():
    with pytest.raises(ValueError, match="image_aspect"):
        LlavaPluginImageProcessor(image_aspect="letterbox")
