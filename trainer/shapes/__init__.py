"""The shapes world: LLaVA's whole pipeline in miniature (issue 5): the world and its judge, the foundation parts, the
pipeline (`llava-shapes`) and its report."""

from .world import COLORS, GRID, SHAPES, Thing, judge, make_scene, questions, render, write_split

__all__ = ["COLORS", "GRID", "SHAPES", "Thing", "judge", "make_scene", "questions", "render", "write_split"]
