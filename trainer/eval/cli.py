"""llava-eval: evaluate a llava_plugin checkpoint.

  judge   LLaVA-Bench style: a judge model scores reference and candidate answers; relative score per category
  mc      multiple-choice accuracy (ScienceQA style) per subject
  shapes  the shapes world's accuracy per question type on held-out images
  shapes-probe  what the model's image tokens tell about the shapes world (trainer/shapes/probe.py)
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import openai

from .judge import DEFAULT_JUDGE, JudgeSettings, load_questions, run_judge
from .multiple_choice import DEFAULT_FORMAT, evaluate_multiple_choice, load_problems, multiple_choice_report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llava-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--model", required=True, help="the llava_plugin checkpoint to evaluate (folder or hub id)")
        sub.add_argument("--output", required=True, help="folder for answers, scores and report.md (reruns resume)")
        sub.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
        sub.add_argument("--max-new-tokens", type=int, default=512, help="(default: %(default)s)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    judge = commands.add_parser("judge", help="GPT-judged relative score (LLaVA-Bench)")
    common(judge)
    judge.add_argument("--questions", required=True, help="JSONL: question_id, image, text, category[, context, reference]")
    judge.add_argument("--context", help="JSONL: image, caption (LLaVA-Bench context.jsonl)")
    judge.add_argument("--references", help="JSONL: question_id, text (e.g. answers_gpt4.jsonl); missing ones are generated")
    judge.add_argument("--image-folder", default=".", help="(default: %(default)s)")
    judge.add_argument("--judge-model", default=DEFAULT_JUDGE, help="(default: %(default)s)")
    judge.add_argument("--reference-model", default=DEFAULT_JUDGE, help="text-only model for missing references (default: %(default)s)")
    judge.add_argument("--base-url", help="any OpenAI-compatible server; key from OPENAI_API_KEY")
    judge.add_argument("--concurrency", type=int, default=8, help="(default: %(default)s)")
    judge.add_argument("--parse-retries", type=int, default=2, help="new judgements asked for an unparsable one (default: %(default)s)")
    judge.add_argument("--max-retries", type=int, default=8, help="client retries on 429, 5xx, timeouts (default: %(default)s)")
    judge.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    judge.add_argument("--temperature", type=float, default=0.2, help="judge and reference temperature (default: %(default)s)")
    judge.add_argument("--seed", type=int, default=0, help="seeds the answer order shown to the judge")

    mc = commands.add_parser("mc", help="multiple-choice accuracy (ScienceQA style)")
    common(mc)
    mc.add_argument("--problems", required=True, help="JSONL (id, question, options, answer[, context, image, subject]) or ScienceQA problems.json")
    mc.add_argument("--split", help="ScienceQA split to use (e.g. test)")
    mc.add_argument("--image-folder", default=".", help="(default: %(default)s)")
    mc.add_argument("--prompt-format", default=DEFAULT_FORMAT, help="with {context}, {question}, {options} (default: %(default)r)")

    shapes = commands.add_parser("shapes", help="shapes-world accuracy per question type")
    common(shapes)
    shapes.add_argument("--split", help="a shapes-world JSONL (images beside it under images/); default: a fresh held-out split")
    shapes.add_argument("--images", type=int, default=200, help="held-out images to make when no --split (default: %(default)s)")
    shapes.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    shapes.add_argument("--opener", help="ask every question as a follow-up: second turn, after this question and the model's own answer")

    probe = commands.add_parser("shapes-probe", help="probes on the model's image tokens: colour, shape, place; place from their mean")
    probe.add_argument("--model", required=True, help="a llava_plugin checkpoint with a shapes-world tower (9 image tokens)")
    probe.add_argument("--output", required=True, help="folder for scores.json")
    probe.add_argument("--split", help="a shapes-world JSONL (images beside it under images/); default: a fresh split")
    probe.add_argument("--images", type=int, default=1000, help="images to make when no --split (default: %(default)s)")
    probe.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return parser.parse_args(argv)


def judge_command(args, candidate) -> dict:
    questions = load_questions(Path(args.questions), args.context and Path(args.context), args.references and Path(args.references))
    folder = Path(args.image_folder)
    settings = JudgeSettings(judge_model=args.judge_model, reference_model=args.reference_model, base_url=args.base_url,
                             concurrency=args.concurrency, parse_retries=args.parse_retries, max_retries=args.max_retries,
                             timeout=args.timeout, temperature=args.temperature, seed=args.seed, progress_bar=not args.quiet)
    scores = run_judge(questions, lambda q: candidate.answer(q.text, q.image and folder / q.image), Path(args.output),
                       settings, candidate.name)
    return {name: round(s["relative"], 1) if s["relative"] is not None else None for name, s in scores.items()}


def mc_command(args, candidate) -> dict:
    problems = load_problems(Path(args.problems), args.split)
    if not problems:
        raise ValueError(f"{args.problems}: no problems{' in split ' + args.split if args.split else ''}")
    folder, output = Path(args.image_folder), Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    scores = evaluate_multiple_choice(problems, lambda p, text: candidate.answer(text, p.image and folder / p.image),
                                      output / "answers.jsonl", args.prompt_format, progress=not args.quiet)
    (output / "scores.json").write_text(json.dumps(scores, indent=1))
    (output / "report.md").write_text(multiple_choice_report(scores, candidate.name, args.prompt_format))
    return {subject: round(100 * s["accuracy"], 2) for subject, s in scores.items()}


def shapes_command(args, candidate) -> dict:
    from trainer.shapes.world import write_split

    from .shapes import evaluate_shapes, load_split, shapes_report

    output = Path(args.output)
    split = Path(args.split) if args.split else write_split(output / "world", "test", args.images, args.seed)
    result = evaluate_shapes(candidate, load_split(split), split.parent / "images", output / "answers.jsonl", args.seed,
                             progress=not args.quiet, opener=args.opener)
    (output / "scores.json").write_text(json.dumps(result, indent=1))
    (output / "report.md").write_text(shapes_report(result, candidate.name))
    return {kind: round(100 * accuracy, 1) for kind, accuracy in result["accuracy"].items()}


def shapes_probe_command(args) -> dict:
    from transformers import AutoModel, AutoProcessor

    import llava_plugin  # noqa: F401  (registers the Auto classes)
    from llava_plugin import load_image
    from trainer.shapes.probe import model_features, probe_features
    from trainer.shapes.world import write_split

    from .shapes import load_split

    output = Path(args.output)
    split = Path(args.split) if args.split else write_split(output / "world", "probe", args.images, args.seed)
    records = load_split(split)
    model, processor = AutoModel.from_pretrained(args.model).eval(), AutoProcessor.from_pretrained(args.model)
    features = model_features(model, processor, [load_image(split.parent / "images" / record["image"]) for record in records])
    result = {name: round(100 * accuracy, 1) for name, accuracy in
              probe_features(features, [record["things"] for record in records], args.seed).items()}
    output.mkdir(parents=True, exist_ok=True)
    (output / "scores.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from .candidate import Candidate

    try:
        if args.command == "shapes-probe":
            print(json.dumps(shapes_probe_command(args), indent=1))
            return 0
        candidate = Candidate(args.model, args.device, args.max_new_tokens)
        command = {"judge": judge_command, "mc": mc_command, "shapes": shapes_command}[args.command]
        summary = command(args, candidate)
    except (ValueError, RuntimeError, OSError, openai.OpenAIError) as error:  # FATAL_ERRORS are OpenAIErrors
        print(f"llava-eval {args.command}: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    print(f"report: {Path(args.output) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
