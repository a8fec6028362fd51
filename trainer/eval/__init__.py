"""llava-eval: the paper's GPT-4-judged relative score (`judge`), ScienceQA-style multiple-choice accuracy (`mc`) and
the shapes world's accuracy per question type (`shapes`). Every run writes its answers and scores as resumable JSONL
and a markdown report."""
