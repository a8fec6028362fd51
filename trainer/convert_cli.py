"""llava-convert: checkpoints in, checkpoints out, with the weights untouched (the work is llava_plugin.convert's).

    llava-convert SRC DST                    llava-hf (LLaVA or LLaVA-NeXT) or original LLaVA  ->  llava_plugin
    llava-convert SRC DST --to llava-hf      llava_plugin  ->  llava-hf (transformers' LlavaForConditionalGeneration, or
                                             LlavaNextForConditionalGeneration for an AnyRes model)

SRC is a folder or a hub id; the format is read from its config. DST is written to a temporary folder and renamed
into place, so a failed conversion leaves nothing behind.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llava-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SRC", help="checkpoint folder or hub id (llava-hf, original LLaVA or llava_plugin)")
    parser.add_argument("destination", metavar="DST", help="new folder to write")
    parser.add_argument("--to", choices=("llava_plugin", "llava-hf"), default="llava_plugin", help="output format (default: %(default)s)")
    parser.add_argument("--vision-tower", help="original LLaVA only: the tower to use instead of the config's mm_vision_tower")
    args = parser.parse_args(argv)
    from llava_plugin.convert import convert  # after parsing: it imports torch and transformers

    try:
        found = convert(args.source, args.destination, args.to, args.vision_tower)
    except (OSError, ValueError) as error:
        print(f"llava-convert: {error}", file=sys.stderr)
        return 2
    print(f"converted {args.source} ({found}) -> {args.destination} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
