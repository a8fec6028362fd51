"""Instruction data generation: a text-only LLM (or the offline drafter) turns captions and boxes into
conversations, detailed descriptions and complex reasoning, as LLaVA JSON."""

from .annotations import AnnotationError, Box, ImageAnnotation, load_annotations, parse_record
from .prompts import KINDS
from .run import DatagenConfig, Summary, draft_records, generate, run_datagen
from .symbolic import symbolic_text

__all__ = [
    "KINDS", "AnnotationError", "Box", "DatagenConfig", "ImageAnnotation", "Summary", "draft_records", "generate",
    "load_annotations", "parse_record", "run_datagen", "symbolic_text",
]
