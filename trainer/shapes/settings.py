"""llava-shapes' settings and command line, apart from the pipeline: the pipeline imports torch, open_clip and
transformers, and `llava-shapes --help` should answer at once."""

import argparse
import dataclasses

TOWER_WIDTH = 192  # the shapes tower's width (foundation.TOWER); a setting, so its default lives here


@dataclasses.dataclass
class ShapesSettings:
    output: str = "out/shapes"
    train_images: int = 2000
    test_images: int = 200
    seed: int = 0
    tower_steps: int = 1000
    tower_width: int = TOWER_WIDTH
    tower_scenes: int = 2000
    lm_steps: int = 300
    stage1_epochs: float = 12.0
    stage2_epochs: float = 4.0
    batch_size: int = 64
    # What "Where is ...?" needs (issue 5's notes): the tower's position embedding started at the norm of a patch's
    # content (0: open_clip's start), the question before the image in the chat template, stage 2 batches that mix
    # the question kinds (lengths compared in steps of this many tokens; 1: exact sorting), and enough of those
    # questions in them (`where_copies`).
    position_embedding_norm: float = 13.0
    image_after_text: bool = True
    # 48, not 64: with the two-turn samples (about 66 tokens), 64-token steps put them beside the drafts (about 120) and
    # padded 37% of stage 2's tokens (48: 22%), while batches stay mixed (the commonest kind 40% of a batch on average).
    length_bucket: int = 48
    follow_ups: int = 1  # questions per image asked as a conversation's second turn (`vqa_records`)
    where_copies: int = 3  # more copies of each one-question "Where is ...?" sample in stage 2 (`where_again`)
    ablations: bool = False
    report: str | None = None  # also copy report.md and accuracy.png here
    export: str | None = None  # save the trained model in fp16 here, with a model card


def command_line(settings: ShapesSettings) -> str:
    defaults = ShapesSettings()
    flags = [f"--{'' if value else 'no-'}{key.replace('_', '-')}" if isinstance(value, bool) else f"--{key.replace('_', '-')} {value}"
             for key, value in dataclasses.asdict(settings).items()
             if value != getattr(defaults, key) and value is not None and key != "output"]
    return " ".join(["llava-shapes", *flags])


def parse_settings(argv=None) -> ShapesSettings:
    parser = argparse.ArgumentParser(prog="llava-shapes", description="the whole LLaVA pipeline in miniature, each "
                                     "step with the project's real code (see trainer/shapes/pipeline.py)")
    defaults = ShapesSettings()
    for field in dataclasses.fields(ShapesSettings):
        flag, default = "--" + field.name.replace("_", "-"), getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default) if default is not None else str, default=default,
                                help="(default: %(default)s)")
    return ShapesSettings(**vars(parser.parse_args(argv)))
