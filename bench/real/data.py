"""The benchmark's tasks, read from installed packages (Debian packages and pip wheels; nothing is downloaded).

Text tasks (inputs: strings):
  * ``topic``      English fortunes (``fortunes``), 6 categories: which file a quote comes from.
  * ``language``   fortunes in 6 languages (``fortunes``, ``fortunes-de/-es/-it/-pl/-br``): language ID.
  * ``noun_sense`` WordNet noun glosses (``wordnet-base``), 8 lexicographer supersenses (noun.animal, …).
  * ``verb_sense`` WordNet verb glosses (``wordnet-base``), 8 verb supersenses (verb.motion, …).
Vision tasks (inputs: float images (N, 3, S, S) in [0, 1]):
  * ``fashion``    Fashion-MNIST (``dataset-fashion-mnist``), 10 classes.
  * ``digits``     scikit-learn's bundled 8×8 digits, 10 classes.
  * ``texture``    patches of scikit-learn's two bundled photos, 8 classes (which region of which photo);
                   training and test patches from disjoint cells (a checkerboard) of each region.

Every loader returns ``Task(name, classes, train, test)`` with (inputs, labels) splits drawn by a seeded
permutation (texture: seeded patch positions), balanced per class (``per_class`` training and ``test_per_class``
test examples per class).
A missing package raises ``MissingData`` naming the package to install.
"""
from __future__ import annotations

import gzip
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
FASHION = Path("/usr/share/datasets/fashion-mnist")
SETUP_HINT = "run bench/real/setup.sh (apt-get install -y {pkg})"


class MissingData(RuntimeError):
    """A data set's package is not installed; the message names it."""


@dataclass
class Task:
    name: str
    classes: list[str]
    train: tuple[list, list[int]]   # (inputs, labels)
    test: tuple[list, list[int]]


def _need(path: Path, pkg: str) -> Path:
    if not path.exists():
        raise MissingData(f"{path} not found: the Debian package {pkg!r} is not installed; "
                          + SETUP_HINT.format(pkg=pkg))
    return path


def _read_fortunes(path: Path, max_chars: int = 400) -> list[str]:
    """The quotes of one fortune file ('%' lines separate them), whitespace-normalised, ASCII art dropped."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    out = []
    for q in text.split("\n%\n"):
        q = " ".join(q.split())
        letters = sum(c.isalpha() for c in q)
        if 20 <= len(q) <= max_chars and letters >= 0.6 * len(q):
            out.append(q)
    return out


def _fortune_dir(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8"))


def _split(name: str, classes: Sequence[str], items: Sequence[Sequence], per_class: int, test_per_class: int,
           seed: int) -> Task:
    """Balanced train/test split: per class, a seeded shuffle, the first test_per_class to test, next per_class to
    train. Classes with fewer items give what they have (train gets the rest after the test share)."""
    rng = random.Random(f"{name}-{seed}")
    tr_x, tr_y, te_x, te_y = [], [], [], []
    for c, xs in enumerate(items):
        xs = list(xs)
        rng.shuffle(xs)
        n_test = min(test_per_class, len(xs) // 3)
        te_x += xs[:n_test]
        te_y += [c] * n_test
        tr = xs[n_test:n_test + per_class]
        tr_x += tr
        tr_y += [c] * len(tr)
    return Task(name, list(classes), (tr_x, tr_y), (te_x, te_y))


# ----------------------------------------------------------------------------------------------------- text
TOPICS = ("computers", "food", "law", "politics", "science", "songs-poems")
LANGUAGES = {"en": ("fortunes", None), "de": ("fortunes-de", "de"), "es": ("fortunes-es", "es"),
             "it": ("fortunes-it", "it"), "pl": ("fortunes-pl", "pl"), "pt": ("fortunes-br", "brasil")}
NOUN_SENSES = {"04": "noun.act", "05": "noun.animal", "06": "noun.artifact", "10": "noun.communication",
               "15": "noun.location", "18": "noun.person", "20": "noun.plant", "26": "noun.state"}
VERB_SENSES = {"30": "verb.change", "31": "verb.cognition", "32": "verb.communication", "35": "verb.contact",
               "38": "verb.motion", "40": "verb.possession", "41": "verb.social", "42": "verb.stative"}


def topic(per_class: int, test_per_class: int, seed: int) -> Task:
    items = [_read_fortunes(_need(FORTUNES / t, "fortunes")) for t in TOPICS]
    return _split("topic", TOPICS, items, per_class, test_per_class, seed)


def language(per_class: int, test_per_class: int, seed: int) -> Task:
    items = []
    for lang, (pkg, sub) in LANGUAGES.items():
        if sub is None:  # English: the categories of the base package, not the topic task's files
            files = [p for p in _fortune_dir(_need(FORTUNES, pkg)) if p.name not in TOPICS
                     and (p.parent / (p.name + ".u8")).exists()]
        else:
            p = _need(FORTUNES / sub, pkg)
            files = _fortune_dir(p) if p.is_dir() else [p]
        quotes = [q for f in files for q in _read_fortunes(f)]
        items.append(sorted(set(quotes)))
    return _split("language", list(LANGUAGES), items, per_class, test_per_class, seed)


def _wordnet_glosses(pos: str, senses: dict[str, str]) -> list[list[str]]:
    path = _need(WORDNET / f"data.{pos}", "wordnet-base")
    by_sense: dict[str, list[str]] = {k: [] for k in senses}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the license header
                continue
            head, _, gloss = line.partition(" | ")
            lex = head.split(" ", 2)[1]
            if lex in by_sense:
                g = gloss.split('; "')[0].strip()
                if len(g) >= 10:
                    by_sense[lex].append(g)
    return [sorted(set(v)) for v in by_sense.values()]


def noun_sense(per_class: int, test_per_class: int, seed: int) -> Task:
    return _split("noun_sense", list(NOUN_SENSES.values()), _wordnet_glosses("noun", NOUN_SENSES), per_class,
                  test_per_class, seed)


def verb_sense(per_class: int, test_per_class: int, seed: int) -> Task:
    return _split("verb_sense", list(VERB_SENSES.values()), _wordnet_glosses("verb", VERB_SENSES), per_class,
                  test_per_class, seed)


# ----------------------------------------------------------------------------------------------------- vision
def _to_rgb(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W) grey uint8/float → (N, 3, size, size) float in [0, 1] (bilinear resize)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    x = x / x.max().clamp_min(1.0)
    x = torch.nn.functional.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion(per_class: int, test_per_class: int, seed: int, size: int) -> Task:
    d = _need(FASHION, "dataset-fashion-mnist")
    x = _idx(d / "t10k-images-idx3-ubyte.gz")  # the 10k test file is plenty for our subsets
    y = _idx(d / "t10k-labels-idx1-ubyte.gz")
    classes = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    return _image_task("fashion", classes, [np.flatnonzero(y == c) for c in range(10)], x, per_class,
                       test_per_class, seed, size)


def digits(per_class: int, test_per_class: int, seed: int, size: int) -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.images, d.target
    return _image_task("digits", [str(c) for c in range(10)], [np.flatnonzero(y == c) for c in range(10)], x,
                       per_class, test_per_class, seed, size)


TEXTURE_PATCH = 48   # px, cut from the photo, then resized to ``size``
TEXTURE_CELLS = (4, 5)  # each region cut in 4 × 5 cells (53 × 64 px in the 427 × 640 photos): a checkerboard of them


def texture(per_class: int, test_per_class: int, seed: int, size: int) -> Task:
    """Random 48×48 patches of the two photos scikit-learn bundles, each photo cut in 2×2 regions: 8 classes.

    Training and test patches never share a pixel: each region is cut in a 4 × 5 grid of cells, the cells
    coloured like a checkerboard; training patches lie inside the "white" cells, test patches inside the
    "black" ones (each patch wholly inside one cell), so both cover the whole region but no test patch overlaps
    a training patch. Cell and position within it drawn uniformly (seeded)."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    rng = np.random.default_rng(seed)
    P, (R, C) = TEXTURE_PATCH, TEXTURE_CELLS
    parts: dict[int, list] = {0: [], 1: []}
    labels: dict[int, list[int]] = {0: [], 1: []}
    c = 0
    for img in imgs:
        H, W, _ = img.shape
        for ry in range(2):
            for rx in range(2):
                y0, x0, h, w = ry * H // 2, rx * W // 2, H // 2, W // 2
                cells = [[(i, j) for i in range(R) for j in range(C) if (i + j) % 2 == split] for split in (0, 1)]
                for split, n in ((0, per_class), (1, test_per_class)):
                    for k in rng.integers(0, len(cells[split]), n):
                        i, j = cells[split][k]
                        cy0, cy1 = y0 + i * h // R, y0 + (i + 1) * h // R
                        cx0, cx1 = x0 + j * w // C, x0 + (j + 1) * w // C
                        a, b = rng.integers(cy0, cy1 - P + 1), rng.integers(cx0, cx1 - P + 1)
                        parts[split].append(img[a:a + P, b:b + P])
                        labels[split].append(c)
                c += 1

    def conv(patches) -> torch.Tensor:
        x = torch.as_tensor(np.stack(patches), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    classes = [f"{p}-{r}" for p in ("china", "flower") for r in ("tl", "tr", "bl", "br")]
    return Task("texture", classes, (conv(parts[0]), labels[0]), (conv(parts[1]), labels[1]))


def _image_task(name, classes, groups, x, per_class, test_per_class, seed, size) -> Task:
    task = _split(name, classes, [g.tolist() for g in groups], per_class, test_per_class, seed)
    conv = lambda idx: _to_rgb(x[idx], size)  # noqa: E731
    (tr_i, tr_y), (te_i, te_y) = task.train, task.test
    task.train, task.test = (conv(np.asarray(tr_i)), tr_y), (conv(np.asarray(te_i)), te_y)
    return task


TEXT_TASKS: dict[str, Callable[..., Task]] = {"topic": topic, "language": language, "noun_sense": noun_sense,
                                              "verb_sense": verb_sense}
VISION_TASKS: dict[str, Callable[..., Task]] = {"fashion": fashion, "digits": digits, "texture": texture}
