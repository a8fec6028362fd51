"""What a model's image tokens tell about the shapes world, read by small probes trained on them.

Three readings, each a probe trained on most of the images and scored on the rest:
- token: from the image token of a thing's own cell, its colour, its shape and its cell;
- bag: from the mean of all image tokens and the asked colour and shape, that thing's cell. A language model that
  attends to the image tokens alike (a bag) answers "Where is the {color} {shape}?" only if this reading can;
- match: which of the nine tokens is the asked thing's, picked by a bilinear score of the asked colour and shape
  against each token (what one attention head does), in scenes of two or three things. A language model that answers
  "Where is ...?" by attending to the asked thing needs this reading high. The committed tower's tokens give 99%; its
  language model learns the lookup only from enough "Where is ...?" questions (`trainer.shapes.pipeline.where_again`).
A tower whose position embedding starts at open_clip's norm keeps a thing's cell mostly in which token it is (the
token reading 24%, the bag at chance; the model made on such a tower answered "Where is ...?" 9% right); the committed
tower, its position embedding started at the norm of a patch's content, gives the cell from the token 100% of the
time. Check a tower recipe with this probe (a minute) before a 20-minute pipeline run.
"""

import torch

from .world import COLORS, GRID, SHAPES

PROBE_HIDDEN = 256


def fit_probe(inputs: torch.Tensor, targets: torch.Tensor, classes: int, train: torch.Tensor, steps: int, seed: int) -> float:
    """An MLP on standardised inputs, trained full-batch on the `train` rows; accuracy on the others."""
    mean, std = inputs[train].mean(0), inputs[train].std(0) + 1e-6
    inputs = (inputs - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Sequential(torch.nn.Linear(inputs.shape[1], PROBE_HIDDEN), torch.nn.GELU(), torch.nn.Linear(PROBE_HIDDEN, classes))
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(probe(inputs[train]), targets[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(inputs[~train]).argmax(-1) == targets[~train]).float().mean().item()


def probe_features(features: torch.Tensor, scenes: list[list[dict]], seed: int = 0, steps: int = 600,
                   train_fraction: float = 0.8) -> dict[str, float]:
    """Accuracy of each reading. `features`: one row of 9 image tokens per scene, token i for grid cell i (in
    reading order, as 96-px images with 32-px patches give them); `scenes`: each scene's things as dicts (shape,
    color, position)."""
    if features.ndim != 3 or features.shape[:2] != (len(scenes), len(GRID)):
        raise ValueError(f"features of shape {tuple(features.shape)}: want ({len(scenes)} scenes, {len(GRID)} tokens, width)")
    features = features.float()
    held_out = int(len(scenes) * train_fraction)
    if not 0 < held_out < len(scenes):
        raise ValueError(f"{len(scenes)} scenes cannot be split {train_fraction:.0%} / {1 - train_fraction:.0%} into training and held-out")
    tokens, labels, token_scene = [], {"color": [], "shape": [], "cell": []}, []
    for index, things in enumerate(scenes):
        for thing in things:
            cell = GRID.index(thing["position"])
            tokens.append(features[index, cell])
            labels["color"].append(list(COLORS).index(thing["color"]))
            labels["shape"].append(SHAPES.index(thing["shape"]))
            labels["cell"].append(cell)
            token_scene.append(index)
    train = torch.tensor(token_scene) < held_out
    result = {f"token: {name}": fit_probe(torch.stack(tokens), torch.tensor(values), classes, train, steps, seed)
              for (name, values), classes in zip(labels.items(), (len(COLORS), len(SHAPES), len(GRID)))}
    queries, cells, asked_scene = [], [], []
    for index, things in enumerate(scenes):
        for thing in things:
            # "Where is the {color} {shape}?" is asked only when no other thing has that colour and shape.
            if sum(t["color"] == thing["color"] and t["shape"] == thing["shape"] for t in things) == 1:
                query = torch.zeros(len(COLORS) + len(SHAPES))
                query[list(COLORS).index(thing["color"])] = query[len(COLORS) + SHAPES.index(thing["shape"])] = 1.0
                queries.append(query)
                cells.append(GRID.index(thing["position"]))
                asked_scene.append(index)
    queries, cells, asked_scene = torch.stack(queries), torch.tensor(cells), torch.tensor(asked_scene)
    bags = torch.cat([features[asked_scene].mean(1), queries], dim=1)
    result["bag: cell of the asked thing"] = fit_probe(bags, cells, len(GRID), asked_scene < held_out, steps, seed)
    crowded = torch.tensor([len(scenes[index]) > 1 for index in asked_scene.tolist()])
    result["match: token of the asked thing"] = fit_match(features[asked_scene[crowded]], queries[crowded], cells[crowded],
                                                          asked_scene[crowded] < held_out, steps, seed)
    return result


def fit_match(tokens: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor, train: torch.Tensor, steps: int, seed: int,
              rank: int = 32) -> float:
    """Scores query . token in a learnt rank-`rank` space, softmax over each row's tokens; how often the held-out rows'
    best-scored token is the target. `tokens`: (rows, tokens, width), standardised per channel on the `train` rows."""
    flat = tokens[train].flatten(0, 1)
    tokens = (tokens - flat.mean(0)) / (flat.std(0) + 1e-6)
    torch.manual_seed(seed)
    query, key = torch.nn.Linear(queries.shape[1], rank), torch.nn.Linear(tokens.shape[2], rank)
    optimizer = torch.optim.Adam([*query.parameters(), *key.parameters()], lr=3e-3)

    def scores(rows):
        return torch.einsum("nr,ntr->nt", query(queries[rows]), key(tokens[rows])) / rank ** 0.5

    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(scores(train), targets[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (scores(~train).argmax(-1) == targets[~train]).float().mean().item()


def model_features(model, processor, images: list, batch_size: int = 64) -> torch.Tensor:
    """The image tokens a llava_plugin model feeds its projector (its vision feature layer), for PIL images."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = processor.image_processor(images[start:start + batch_size], return_tensors="pt")["pixel_values"]
            rows.append(model.get_vision_features(pixels.to(model.dtype)).float())
    features = torch.cat(rows)
    if features.shape[1] != len(GRID):
        raise ValueError(f"the model gives {features.shape[1]} image tokens; the probe needs one per grid cell ({len(GRID)}: "
                         "96-px images with 32-px patches, as the shapes world's tower)")
    return features
