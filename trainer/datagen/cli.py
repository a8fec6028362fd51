"""llava-datagen: draft LLaVA instruction data from captions and boxes."""

import argparse
import asyncio
import logging
import os
import sys

from .annotations import AnnotationError
from .openai_backend import DEFAULT_MODEL, FATAL_ERRORS
from .prompts import KINDS
from .run import BACKENDS, DatagenConfig, generate, run_batch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llava-datagen", description=__doc__)
    parser.add_argument("--input", nargs="+", required=True, metavar="ANN",
                        help="one JSONL file (ours, or caps_boxes records with normalized 'instances'), or two COCO files: captions then instances")
    parser.add_argument("--output", required=True, help="LLaVA JSON to write (progress and rejects go beside it)")
    parser.add_argument("--types", default=",".join(KINDS), help="comma-separated kinds (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="offline", help="(default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name for the openai backend (default: %(default)s)")
    parser.add_argument("--base-url", help="any OpenAI-compatible server (vLLM, Ollama, a gateway); key from OPENAI_API_KEY")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--seed", type=int, default=0, help="seeds the offline drafter and the <image> placement")
    parser.add_argument("--parse-retries", type=int, default=2, help="new drafts asked for an unusable answer (default: %(default)s)")
    parser.add_argument("--max-retries", type=int, default=8, help="client retries on 429, 5xx, timeouts (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7, help="(default: %(default)s)")
    parser.add_argument("--retry-rejects", action="store_true", help="draft again the jobs in the rejects file")
    parser.add_argument("--prompts", metavar="DIR",
                        help="the original LLaVA's prompt folder (conversation/, detail_description/, complex_reasoning/)")
    parser.add_argument("--batch-api", action="store_true", help="submit through the OpenAI Batch API; run again to collect")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        config = DatagenConfig(
            inputs=args.input, output=args.output, kinds=tuple(kind.strip() for kind in args.types.split(",") if kind.strip()),
            backend="openai" if args.batch_api else args.backend, model=args.model, base_url=args.base_url,
            concurrency=args.concurrency, limit=args.limit, seed=args.seed, parse_retries=args.parse_retries,
            max_retries=args.max_retries, timeout=args.timeout, temperature=args.temperature, retry_rejects=args.retry_rejects, prompts=args.prompts,
        )
        if config.backend == "openai" and not (config.api_key or os.environ.get("OPENAI_API_KEY")):
            raise ValueError("the openai backend needs an API key: set OPENAI_API_KEY (a local server such as vLLM or "
                             "Ollama accepts any non-empty key, e.g. OPENAI_API_KEY=local), or use --backend offline")
        if args.batch_api:
            status, summary = asyncio.run(run_batch(config))
            print(status)
        else:
            summary = generate(config)
    except (AnnotationError, ValueError, *FATAL_ERRORS) as error:
        print(f"llava-datagen: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llava-datagen: interrupted; progress is saved, run the same command to continue", file=sys.stderr)
        return 130
    print("\n".join(summary.lines()))
    return 0 if summary.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
