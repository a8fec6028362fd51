"""llava-train: stage 1 (feature alignment) or stage 2 (instruction tuning); see `llava-train --help`."""

import logging
import sys

from .settings import parse_settings


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = parse_settings(argv)
    except ValueError as error:
        print(f"llava-train: {error}", file=sys.stderr)
        return 2
    # After parsing, so that --help and a wrong flag answer at once: these import torch and transformers.
    from .data import DataError
    from .finite import NonFiniteError
    from .loop import check_data, train

    try:
        if settings.check_data:
            return check_data(settings)
        train(settings)
    except (DataError, ValueError, OSError) as error:  # OSError: a model or file that cannot be read, named
        print(f"llava-train: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        print(f"llava-train: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
