"""The shapes-world report: a markdown table of held-out accuracy per question type for each variant (the full
pipeline and its ablations), against the targets, and the same as a bar chart drawn with PIL."""

from pathlib import Path

from PIL import Image, ImageDraw

from .world import KINDS

TARGETS = {"color": 0.95, "shape": 0.95, "count": 0.90, "position": 0.85, "yes/no": 0.90, "describe": 0.80}
BAR_COLORS = [(40, 90, 200), (230, 140, 30), (60, 160, 80), (150, 60, 170)]


def accuracy_table(variants: dict[str, dict]) -> str:
    """variants: name -> evaluation result (accuracy and counts per kind)."""
    names = list(variants)
    lines = ["| question | target | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for kind in KINDS:
        cells = [f"{100 * variants[name]['accuracy'][kind]:.1f}%" for name in names]
        lines.append(f"| {kind} | {100 * TARGETS[kind]:.0f}% | " + " | ".join(cells) + " |")
    counts = next(iter(variants.values()))["counts"]
    lines.append("\nQuestions per type: " + ", ".join(f"{kind} {counts[kind]}" for kind in KINDS) + ".")
    return "\n".join(lines)


def draw_chart(variants: dict[str, dict], path: Path, width: int = 900, height: int = 420) -> Path:
    """Grouped bars per question type, one colour per variant, a black tick at each target."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 50, width - 20, 20, height - 70
    for percent in range(0, 101, 20):
        y = bottom - (bottom - top) * percent / 100
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.text((8, y - 6), f"{percent}%", fill="black")
    group = (right - left) / len(KINDS)
    bar = group * 0.8 / len(variants)
    for k, kind in enumerate(KINDS):
        x0 = left + k * group + group * 0.1
        for v, (name, result) in enumerate(variants.items()):
            value = result["accuracy"][kind]
            x = x0 + v * bar
            draw.rectangle((x, bottom - (bottom - top) * value, x + bar - 2, bottom), fill=BAR_COLORS[v % len(BAR_COLORS)])
        target_y = bottom - (bottom - top) * TARGETS[kind]
        draw.line((x0 - 3, target_y, x0 + group * 0.8 + 3, target_y), fill="black", width=2)
        draw.text((x0 + group * 0.25, bottom + 6), kind, fill="black")
    for v, name in enumerate(variants):
        x = left + v * 230
        draw.rectangle((x, height - 30, x + 14, height - 16), fill=BAR_COLORS[v % len(BAR_COLORS)])
        draw.text((x + 20, height - 29), name, fill="black")
    draw.line((left, bottom, right, bottom), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def position_outcomes_sentence(outcomes: dict[str, int]) -> str:
    """What the "Where is ...?" answers named: the right place, another thing's place (the model read a place but for
    the wrong thing), an empty cell (it read no place off the image) or no place at all."""
    total = sum(outcomes.values()) or 1
    return "Answers to \"Where is ...?\" named: " + ", ".join(
        f"{name} {count} ({100 * count / total:.0f}%)" for name, count in outcomes.items()) + "."
