import pytest

from llava_plugin import LlavaPluginConfig, OpenClipVisionConfig

CLIP_336 = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "num_hidden_layers": 24}


def test_image_sequence_length_is_derived_from_the_tower():
    assert LlavaPluginConfig(vision_config=CLIP_336).image_seq_length == 576  # LLaVA-1.5: 24 x 24 patches
    assert LlavaPluginConfig(vision_config={**CLIP_336, "image_size": 224}).image_seq_length == 256  # LLaVA v1
    assert LlavaPluginConfig(vision_config=CLIP_336, vision_feature_select="cls_patch").image_seq_length == 577


def test_siglip_has_no_cls_to_keep():
    siglip = {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14, "num_hidden_layers": 27}
    assert LlavaPluginConfig(vision_config=siglip).image_seq_length == 729
    with pytest.raises(ValueError, match="CLS"):
        LlavaPluginConfig(vision_config=siglip, vision_feature_select="cls_patch")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("projector_type", "mlp2x_relu", "projector_type"),
        ("vision_feature_select", "cls", "vision_feature_select"),
        ("image_aspect", "stretch", "image_aspect"),
        ("vision_feature_layer", 30, "out of range"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        LlavaPluginConfig(vision_config=CLIP_336, **{field: value})


@pytest.mark.parametrize("projector, depth", [("linear", 1), ("mlp2x_gelu", 2), ("mlp4x_gelu", 4)])
def test_projector_depth(projector, depth):
    assert LlavaPluginConfig(projector_type=projector).projector_depth == depth


def test_open_clip_tower_config_round_trips_inline(tmp_path):
    vision_cfg = {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14}
    config = LlavaPluginConfig(
        vision_config={"model_type": "llava_plugin_open_clip", "model_name": "ViT-L-14-336", "pretrained": "openai",
                       "vision_cfg": vision_cfg, "quick_gelu": True},
    )
    config.save_pretrained(tmp_path)
    loaded = LlavaPluginConfig.from_pretrained(tmp_path)
    assert isinstance(loaded.vision_config, OpenClipVisionConfig)
    assert loaded.vision_config.vision_cfg == vision_cfg and loaded.vision_config.quick_gelu
    assert loaded.image_seq_length == 576 and loaded.vision_config.hidden_size == 1024


def test_saved_config_maps_every_auto_class_to_the_remote_code(tmp_path):
    LlavaPluginConfig().save_pretrained(tmp_path)
    auto_map = LlavaPluginConfig.from_pretrained(tmp_path).auto_map
    model_class = "modeling_llava_plugin.LlavaPluginForConditionalGeneration"
    assert auto_map["AutoConfig"] == "configuration_llava_plugin.LlavaPluginConfig"
    assert {auto_map[key] for key in ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText")} == {model_class}
