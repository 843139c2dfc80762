"""Qwen2-VL's processor for images only, for machines without torchvision.

transformers 5 builds ``Qwen2VLProcessor`` (and Qwen2.5-VL's) with a video processor that needs
torchvision, so ``AutoProcessor.from_pretrained`` on a Qwen2-VL checkpoint raises an ImportError where
torchvision is not installed, although images need only the PIL image processor. capvqa feeds these
models one image per prompt (docs/methods.md#end-to-end-vision-language-models), so
:class:`Qwen2VLImageOnlyProcessor` keeps everything Qwen2-VL's processor does for images (the PIL
image processor, the tokenizer, the chat template, one ``<|image_pad|>`` per merged patch as
``image_grid_thw`` says, ``mm_token_type_ids``) and refuses videos.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

__all__ = ["QWEN2_VL_MODEL_TYPES", "Qwen2VLImageOnlyProcessor", "needs_torchvision"]

#: model types whose processors the image-only one stands in for (Qwen2.5-VL's expands images alike)
QWEN2_VL_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})


def needs_torchvision(error: BaseException) -> bool:
    """Whether ``error`` is transformers saying that a class it tried to build needs torchvision."""
    return isinstance(error, ImportError) and "torchvision" in str(error).lower()


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor: the same inputs for images and text.

    Its ``__init__`` names only ``image_processor`` and ``tokenizer``, which is how ``ProcessorMixin``
    knows its parts, so ``Qwen2VLImageOnlyProcessor.from_pretrained(folder_or_hub_id)`` loads a Qwen2-VL
    checkpoint's image processor (the PIL one without torchvision), tokenizer and chat template, and never
    touches the video processor. The image-token expansion is ``Qwen2VLProcessor.replace_image_token``
    itself, inherited.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        # the placeholder tokens and their ids exactly as Qwen2VLProcessor.__init__ sets them
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = (getattr(tokenizer, "image_token_id", None)
                               or tokenizer.convert_tokens_to_ids(self.image_token))
        self.video_token_id = (getattr(tokenizer, "video_token_id", None)
                               or tokenizer.convert_tokens_to_ids(self.video_token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> Any:
        if videos is not None:
            raise ValueError("this Qwen2-VL processor was built without a video processor (transformers' "
                             "needs torchvision): it takes images and text only")
        return super().__call__(images=images, text=text, **kwargs)
