"""capvqa: zero-shot visual question answering through captions.

A frozen vision-language model turns an image into text and a frozen language model answers from that
text. PNP-VQA, Img2LLM and PICa are compositions of the stages in :mod:`capvqa.stages`, run by the cached
engine in :mod:`capvqa.engine`. Importing this package loads no model and configures no logging.
"""

__version__ = "0.1.0"
