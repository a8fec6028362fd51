"""llava-eval: evaluate a llava_plugin checkpoint.

  judge   LLaVA-Bench: a judge model scores reference and candidate answers; relative score per category
  mc      multiple-choice accuracy (ScienceQA), per subject, context modality and grade
  shapes  the shapes world's accuracy per question type on held-out images
  shapes-probe  what the model's image tokens tell about the shapes world (trainer/shapes/probe.py)
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from .options import DEFAULT_FORMAT, DEFAULT_JUDGE, KEY_VARIABLE, ORDERS, PRESET_NAMES

# The commands' modules import torch, transformers and openai: they load after the arguments are parsed, so that
# --help and a wrong flag answer at once.


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llava-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        which = sub.add_mutually_exclusive_group(required=True)
        which.add_argument("--model", help="the llava_plugin checkpoint to evaluate (folder or hub id)")
        which.add_argument("--model-url", help="or a model behind any OpenAI-compatible server, e.g. http://host:8000/v1")
        sub.add_argument("--model-name", help="the served model's name (default: the server's only model)")
        sub.add_argument("--api-key", help=f"key for the --model-url server only (default: ${KEY_VARIABLE}; never OPENAI_API_KEY)")
        sub.add_argument("--output", required=True, help="folder for answers, scores and report.md (reruns resume)")
        sub.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
        sub.add_argument("--max-new-tokens", type=int, default=512, help="(default: %(default)s)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    judge = commands.add_parser("judge", help="GPT-judged relative score (LLaVA-Bench)")
    common(judge)
    judge.add_argument("--questions", required=True, help="JSONL: question_id, image, text, category (conv, detail, complex)")
    judge.add_argument("--context", help="caps_boxes_coco2014_val_80.jsonl (captions, instances) or context.jsonl (caption)")
    judge.add_argument("--references", help="JSONL: question_id, text (qa90_gpt4_answer.jsonl, answers_gpt4.jsonl); missing ones are generated")
    judge.add_argument("--order", choices=ORDERS, default="reference-first",
                       help="which answer the judge sees first; both: ask twice and average (default: %(default)s, the original's)")
    judge.add_argument("--rules", help="the original's rule.json: judge with its prompts, composed as its review script does")
    judge.add_argument("--judge-system", help="the judge's system message (default: this project's own sentence)")
    judge.add_argument("--image-folder", default=".", help="(default: %(default)s)")
    judge.add_argument("--judge-model", default=DEFAULT_JUDGE, help="(default: %(default)s)")
    judge.add_argument("--reference-model", default=DEFAULT_JUDGE, help="text-only model for missing references (default: %(default)s)")
    judge.add_argument("--base-url", help="any OpenAI-compatible server; key from OPENAI_API_KEY")
    judge.add_argument("--concurrency", type=int, default=8, help="(default: %(default)s)")
    judge.add_argument("--parse-retries", type=int, default=2, help="new judgements asked for an unparsable one (default: %(default)s)")
    judge.add_argument("--max-retries", type=int, default=8, help="client retries on 429, 5xx, timeouts (default: %(default)s)")
    judge.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    judge.add_argument("--temperature", type=float, default=0.2, help="judge and reference temperature (default: %(default)s)")

    mc = commands.add_parser("mc", help="multiple-choice accuracy (ScienceQA style)")
    common(mc)
    mc.add_argument("--problems", required=True, help="JSONL (id, question, options, answer[, context, image, subject]) or ScienceQA problems.json")
    mc.add_argument("--split", help="ScienceQA split from pid_splits.json beside problems.json (train, val, test, minival, minitest)")
    mc.add_argument("--image-folder", default=".", help="(default: %(default)s)")
    mc.add_argument("--prompt-format", default=DEFAULT_FORMAT,
                    help=f"a preset ({', '.join(PRESET_NAMES)}) or a template with {{context}}, {{question}}, {{options}} (default: %(default)s)")
    mc.add_argument("--lenient", action="store_true",
                    help="also read a leading letter or an option's exact text (default: only what eval_science_qa.py reads)")

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
    from .judge import JudgeSettings, load_questions, run_judge
    from .review import Wording, load_rules

    questions = load_questions(Path(args.questions), args.context and Path(args.context), args.references and Path(args.references))
    folder = Path(args.image_folder)
    wording = Wording(load_rules(Path(args.rules)) if args.rules else None, args.judge_system)
    settings = JudgeSettings(judge_model=args.judge_model, reference_model=args.reference_model, base_url=args.base_url,
                             concurrency=args.concurrency, parse_retries=args.parse_retries, max_retries=args.max_retries,
                             timeout=args.timeout, temperature=args.temperature, order=args.order, wording=wording,
                             progress_bar=not args.quiet)
    scores = run_judge(questions, lambda q: candidate.answer(q.text, q.image and folder / q.image), Path(args.output),
                       settings, candidate.name)
    return {name: s["relative"] for name, s in scores.items()}


def load_problems(path: Path, split: str | None) -> list:
    from .multiple_choice import load_jsonl_problems
    from .scienceqa import load_scienceqa

    if path.suffix == ".json":
        return load_scienceqa(path, split)
    if split:
        raise ValueError(f"{path}: --split is for ScienceQA's problems.json; a JSONL file is one set")
    return load_jsonl_problems(path)


def mc_command(args, candidate) -> dict:
    from .multiple_choice import evaluate_multiple_choice, multiple_choice_report, parse_choice, prompt_builder, read_choice
    from .scienceqa import COLUMNS

    problems = load_problems(Path(args.problems), args.split)
    if not problems:
        raise ValueError(f"{args.problems}: no problems{' in split ' + args.split if args.split else ''}")
    folder, output = Path(args.image_folder), Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    reader, how = (parse_choice, "leniently") if args.lenient else (read_choice, "as eval_science_qa.py reads them")
    scores = evaluate_multiple_choice(problems, lambda p, text: candidate.answer(text, p.image and folder / p.image),
                                      output / "answers.jsonl", prompt_builder(args.prompt_format), reader,
                                      progress=not args.quiet, order=COLUMNS)
    (output / "scores.json").write_text(json.dumps(scores, indent=1))
    (output / "report.md").write_text(multiple_choice_report(scores, candidate.name, args.prompt_format, how))
    return {group: round(100 * s["accuracy"], 2) for group, s in scores.items()}


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


def make_candidate(args):
    from trainer.settings import check_model_source

    check_model_source("--model", args.model)
    if not args.model_url and (args.model_name or args.api_key):
        raise ValueError("--model-name and --api-key are for a model behind --model-url")
    if args.model_url:
        from .remote import RemoteCandidate

        return RemoteCandidate(args.model_url, args.model_name, args.api_key, args.max_new_tokens)
    from .candidate import Candidate

    return Candidate(args.model, args.device, args.max_new_tokens)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import openai

    try:
        if args.command == "shapes-probe":
            print(json.dumps(shapes_probe_command(args), indent=1))
            return 0
        candidate = make_candidate(args)
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
