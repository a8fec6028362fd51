"""The shapes world: LLaVA's whole pipeline in miniature (issue 5). So far: the world itself and its judge."""

from .world import COLORS, GRID, SHAPES, Thing, judge, make_scene, questions, render, write_split

__all__ = ["COLORS", "GRID", "SHAPES", "Thing", "judge", "make_scene", "questions", "render", "write_split"]
