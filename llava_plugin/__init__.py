"""llava_plugin: a LLaVA model as a transformers custom model.

Importing the package registers it with the Auto classes in this process; saved checkpoints carry the same code
(`auto_map`) so `trust_remote_code=True` loads them where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_llava_plugin import LlavaPluginConfig, OpenClipVisionConfig
from .image_processing_llava_plugin import ImageLoadError, LlavaPluginImageProcessor, load_image
from .modeling_llava_plugin import LlavaPluginForConditionalGeneration, LlavaPluginProjector
from .processing_llava_plugin import LLAVA_V1_CHAT_TEMPLATE, LlavaPluginProcessor, llava_v1_chat_template

AutoConfig.register(LlavaPluginConfig.model_type, LlavaPluginConfig, exist_ok=True)
AutoConfig.register(OpenClipVisionConfig.model_type, OpenClipVisionConfig, exist_ok=True)
for _auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto_class.register(LlavaPluginConfig, LlavaPluginForConditionalGeneration, exist_ok=True)
# One PIL implementation answers both backend requests (transformers asks for "torchvision" first).
AutoImageProcessor.register(
    LlavaPluginConfig, image_processor_classes={"pil": LlavaPluginImageProcessor, "torchvision": LlavaPluginImageProcessor}, exist_ok=True
)
AutoProcessor.register(LlavaPluginConfig, LlavaPluginProcessor, exist_ok=True)

__all__ = [
    "ImageLoadError",
    "LLAVA_V1_CHAT_TEMPLATE",
    "LlavaPluginConfig",
    "LlavaPluginForConditionalGeneration",
    "LlavaPluginImageProcessor",
    "LlavaPluginProcessor",
    "LlavaPluginProjector",
    "OpenClipVisionConfig",
    "llava_v1_chat_template",
    "load_image",
]
