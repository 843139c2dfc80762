"""capvqa's own stages, by name. Every module in this package holds one stage and is named after it.

A pipeline config's ``type:`` is resolved through :mod:`capvqa.engine.registry`: only these stages and
stages a user registers on purpose can be named, so a shared YAML file cannot import arbitrary code.
Modules are imported only when a config names their stage.
"""

from __future__ import annotations

#: Stage class name -> the module that holds it.
BUILTIN_STAGES: dict[str, str] = {
    "GradCamMatching": "capvqa.stages.gradcam_matching",
    "PatchCaptioning": "capvqa.stages.patch_captioning",
    "FiDReader": "capvqa.stages.fid_reader",
    "CaptionFilter": "capvqa.stages.caption_filter",
    "FilteredPatchCaptioning": "capvqa.stages.filtered_patch_captioning",
    "AnswerExtraction": "capvqa.stages.answer_extraction",
    "QuestionGeneration": "capvqa.stages.question_generation",
    "Img2LLMPrompt": "capvqa.stages.img2llm_prompt",
    "LLMAnswerer": "capvqa.stages.llm_answer",
    "ImageCaptioning": "capvqa.stages.image_captioning",
    "ClipTags": "capvqa.stages.clip_tags",
    "ExampleSelection": "capvqa.stages.example_selection",
    "PicaPrompt": "capvqa.stages.pica_prompt",
    "VLMAnswerer": "capvqa.stages.vlm_answer",
    "VLMFewShotAnswerer": "capvqa.stages.vlm_fewshot_answer",
}

#: Dotted paths that saved run configs may still name, from before a module was renamed after its stage.
RENAMED_PATHS: dict[str, str] = {
    "capvqa.stages.matching.GradCamMatching": "GradCamMatching",
    "capvqa.stages.captioning.PatchCaptioning": "PatchCaptioning",
}
