"""llava-shapes: parses its command line before the pipeline (and torch) loads, then runs it."""

import json
import sys
from pathlib import Path

from .settings import parse_settings


def main(argv=None) -> int:
    settings = parse_settings(argv)
    from .pipeline import run

    result = run(settings)
    summary = {name: {kind: round(100 * value, 1) for kind, value in variant["accuracy"].items()}
               for name, variant in result["variants"].items()}
    print(json.dumps({"accuracy": summary, "timings": result["timings"]}, indent=1))
    print(f"report: {Path(settings.output) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
