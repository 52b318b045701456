"""Deterministic synthetic product catalogue in the Rakuten challenge layout.

Writes ``X_train.csv``, ``Y_train.csv``, ``X_test.csv`` and ``image_train/``/``image_test/`` JPEGs
(``image_{imageid}_product_{productid}.jpg``), with the 27 real product-type codes at their real
imbalance. Classes are organised so that no single modality is enough:

* most classes have their own (noisy, overlapping) title vocabulary;
* DESC_GROUPS share a title vocabulary and differ only by description keywords;
* IMAGE_GROUPS share a title vocabulary and differ only by the drawn image (shape, colour, stripes);
* a fraction of titles borrows a neighbouring class's vocabulary.

Only ``numpy.random.default_rng(seed)`` is used, so the same (items, seed) gives identical bytes.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import PipelineError

# Real full-data counts per product-type code (Rakuten France challenge).
CLASS_COUNTS = {2583: 10209, 1560: 5073, 1300: 5045, 2060: 4993, 2522: 4989, 1280: 4870, 2403: 4774,
                2280: 4760, 1920: 4303, 1160: 3953, 1320: 3241, 10: 3116, 2705: 2761, 1140: 2671,
                2582: 2589, 40: 2508, 2585: 2496, 1302: 2491, 1281: 2070, 50: 1681, 2462: 1421,
                2905: 872, 60: 832, 2220: 824, 1301: 807, 1940: 803, 1180: 764}
CODES = list(CLASS_COUNTS)

# Title vocabulary of the classes that have their own (FR mostly, some EN/DE).
TITLE_WORDS = {
    50: "manette chargeur câble support casque controller adaptateur protection station Ladegerät joystick",
    60: "console portable rétro handheld gameboy mini classic Konsole émulateur nintendo sega",
    1140: "figurine pop funko statuette collector personnage manga Figur vinyl anime marvel",
    1160: "carte cartes pokemon yu-gi-oh magic booster holo rare Karte trading deck",
    1180: "warhammer miniature figurines peinture socle escouade wargame citadel 28mm régiment",
    1280: "jouet poupée peluche enfant voiture puzzle Spielzeug toy doll éveil bébé",
    1281: "jeu société plateau dés cartes famille stratégie Brettspiel board party quiz",
    1300: "drone télécommandé hélicoptère rc quadcopter caméra FPV moteur batterie lipo ferngesteuert",
    1301: "chaussettes bébé body pyjama naissance layette socks Socken coton fille garçon",
    1320: "poussette siège auto biberon tétine parapluie langer babyphone Kinderwagen stroller bébé",
    1560: "meuble table chaise armoire commode étagère bureau canapé tiroir Möbel chair",
    1940: "café thé chocolat bonbons épices bio sachet capsules biscuits Kaffee tea sucre",
    2220: "chien chat collier laisse litière gamelle niche griffoir Hund dog croquettes",
    2280: "magazine revue numéro journal mensuel hebdo Zeitschrift issue spécial hors-série",
    2522: "cahier stylo carnet agenda classeur papeterie feutres notebook trousse Heft ramette",
    2583: "piscine filtre pompe spa robot skimmer bâche chlore liner Pool bassin hivernage",
}
# Groups sharing one title vocabulary, separable only by description keywords.
DESC_GROUPS = [
    ("livre roman tome édition histoire auteur volume récit poche collection Buch book novel essai",
     {10: "occasion|bon état|usagé|quelques traces d'usure|second hand",
      2705: "neuf|nouveauté|parution|broché sous film|livre neuf",
      2403: "lot de livres|série complète|ensemble de volumes|bundle|plusieurs tomes"}),
    ("jeu vidéo game edition ps4 xbox switch pc Spiel aventure action deluxe complete",
     {40: "boîtier|disque|notice incluse|cartouche|version boîte",
      2905: "téléchargement|clé steam|code d'activation|version digitale|download",
      2462: "pack console|manettes incluses|lot de jeux|console et jeux|bundle console"}),
]
# Groups sharing one title vocabulary, separable only by the image: code -> (shape, RGB).
IMAGE_GROUPS = [
    ("coussin housse décoration maison salon Kissen cushion motif taie plaid",
     {1920: ("hstripes", (40, 80, 200)), 2060: ("ellipse", (240, 140, 30))}),
    ("jardin extérieur garden Garten terrasse outdoor balcon pelouse résine",
     {2582: ("rectangle", (120, 70, 30)), 2585: ("triangle", (30, 150, 50)),
      1302: ("vstripes", (220, 30, 40))}),
]
NEIGHBOURS = {50: 60, 60: 2462, 1140: 1180, 1180: 1140, 1160: 1281, 1281: 1160, 1280: 1320, 1320: 1301,
              1301: 1280, 1300: 1280, 1560: 2582, 1940: 2220, 2220: 1940, 2280: 10, 2522: 2403,
              2583: 2585, 10: 2280, 2705: 2522, 2403: 2705, 40: 50, 2905: 40, 2462: 60, 1920: 1301,
              2060: 1560, 2582: 1560, 2585: 2583, 1302: 1280}
GENERIC = ("neuf lot de 2 3 pour avec et le la les noir blanc rouge bleu gris taille grand petit nouveau "
           "qualité cadeau original set pack pcs new mit für und the for with premium 100% rapide France "
           "modèle enfant adulte").split()
BRANDS = ("Generic|Sans marque|Xiaomi|Lego|Hasbro|Bandai|Ubisoft|Sony|Samsung|Vtech|Gardena|Intex|"
          "Bestway|Hama|Nintendo|Maped|Clairefontaine|Mattel|Playmobil").split("|")
PUNCT = ["-", "!", "!!", "/", "*", ",", "...", "|", "(", ")", "+", "&amp;", "&#39;", "#"]
DESC_SENTENCES = ["Produit de haute qualité.", "Livraison rapide et soignée.", "Caractéristiques :",
                  "Matériau : plastique et métal.", "Idéal pour offrir à vos proches.", "Garantie 2 ans.",
                  "Contenu du colis : 1 x article.", "Très facile à utiliser & à entretenir.",
                  "100% brand new and high quality.", "Hohe Qualität, schnelle Lieferung.",
                  "Couleur : selon disponibilité.", "Les couleurs peuvent légèrement varier.",
                  "Expédié sous 48h depuis la France.", "Package includes: 1 x item."]
ENTITIES = {"&": "&amp;amp;", "é": "&eacute;", "è": "&egrave;", "à": "&agrave;", "ê": "&ecirc;",
            "'": "&#39;"}  # "&" first, so the entities themselves stay single-escaped
SHAPES = ["ellipse", "rectangle", "triangle", "hstripes", "vstripes"]
PALETTE = [(200, 40, 40), (40, 160, 60), (40, 70, 200), (230, 200, 40), (150, 60, 170), (30, 170, 180),
           (90, 90, 90), (240, 120, 160)]
# Classes outside IMAGE_GROUPS share these few looks, so the image alone only narrows them down.
SHARED_LOOKS = [("ellipse", (90, 90, 90)), ("rectangle", (30, 170, 180)), ("triangle", (150, 60, 170)),
                ("hstripes", (230, 200, 40))]

# Per-class tables derived from the ones above.
CLASS_TITLE = {c: w.split() for c, w in TITLE_WORDS.items()}
CLASS_DESC_KEYS: dict[int, list[str]] = {}
CLASS_SHAPE: dict[int, tuple[str, tuple[int, int, int]]] = {}
for _words, _keys in DESC_GROUPS:
    for _c, _k in _keys.items():
        CLASS_TITLE[_c], CLASS_DESC_KEYS[_c] = _words.split(), _k.split("|")
for _words, _specs in IMAGE_GROUPS:
    for _c, _spec in _specs.items():
        CLASS_TITLE[_c], CLASS_SHAPE[_c] = _words.split(), _spec
for _i, _c in enumerate(c for c in CODES if c not in CLASS_SHAPE):
    CLASS_SHAPE[_c] = SHARED_LOOKS[_i % len(SHARED_LOOKS)]


def _quota(n: int, floor: int) -> np.ndarray:
    """Per-class counts summing to n, proportional to CLASS_COUNTS, each at least ``floor``."""
    w = np.array([CLASS_COUNTS[c] for c in CODES], dtype=float)
    exact = n * w / w.sum()
    q = np.maximum(min(floor, n // len(CODES)), np.floor(exact)).astype(int)
    for i in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if q.sum() >= n:
            break
        q[i] += 1
    while q.sum() > n:  # floors pushed the total over: take back from the largest classes
        q[int(np.argmax(q))] -= 1
    return q


def _noisy(rng: np.random.Generator, word: str) -> str:
    """A typo (adjacent swap or dropped char) on a word, sometimes."""
    if len(word) > 3 and rng.random() < 0.12:
        i = int(rng.integers(0, len(word) - 1))
        return word[:i] + word[i + 1] + word[i] + word[i + 2:] if rng.random() < 0.5 else word[:i] + word[i + 1:]
    return word


def _title(rng: np.random.Generator, code: int) -> str:
    vocab = CLASS_TITLE[NEIGHBOURS[code]] if rng.random() < 0.08 else CLASS_TITLE[code]
    n_class, n_generic = int(rng.integers(1, 4)), int(rng.integers(2, 6))
    if rng.random() < 0.06:  # a few long titles
        n_generic += int(rng.integers(12, 22))
    words = list(rng.choice(vocab, n_class)) + list(rng.choice(GENERIC, n_generic))
    if rng.random() < 0.25:  # cross-class overlap: a word from the neighbour's vocabulary
        words.append(str(rng.choice(CLASS_TITLE[NEIGHBOURS[code]])))
    words = [_noisy(rng, str(w)) for w in rng.permutation(words)]
    if rng.random() < 0.4:
        words.insert(0, str(rng.choice(BRANDS)))
    if rng.random() < 0.5:  # model number
        words.append(f"{chr(65 + int(rng.integers(26)))}{chr(65 + int(rng.integers(26)))}-{rng.integers(10, 9999)}")
    for _ in range(int(rng.integers(0, 3))):  # stray punctuation / HTML residue
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(PUNCT)))
    text = " ".join(words[:30])
    casing = rng.random()
    return text.upper() if casing < 0.15 else text.title() if casing < 0.35 else text


def _description(rng: np.random.Generator, code: int) -> str | None:
    if rng.random() < 0.34:
        return None
    words = list(rng.choice(CLASS_TITLE[code], int(rng.integers(1, 4))))
    if code in CLASS_DESC_KEYS and rng.random() < 0.9:
        words += list(rng.choice(CLASS_DESC_KEYS[code], int(rng.integers(1, 3))))
    parts = [f"<b>{' '.join(str(w) for w in rng.permutation(words))}</b>"]
    parts += list(rng.choice(DESC_SENTENCES, int(rng.integers(1, 7)), replace=False))
    if rng.random() < 0.3:
        parts.insert(1, f"Dimensions : {rng.integers(5, 120)} x {rng.integers(5, 120)} cm")
    seps = ["<br>", "<br />", "</p><p>", " "]
    text = "<p>" + "".join(str(p) + str(rng.choice(seps)) for p in parts) + "</p>"
    if rng.random() < 0.5:  # escaped accents and double-escaped ampersands, as scraped
        for char, entity in ENTITIES.items():
            text = text.replace(char, entity)
    return text


def _image(rng: np.random.Generator, code: int, size: int, noise: np.ndarray) -> Image.Image:
    shape, colour = CLASS_SHAPE[code]
    if rng.random() < 0.15:  # an off-looking picture
        shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], PALETTE[int(rng.integers(len(PALETTE)))]
    bg = tuple(int(v) for v in rng.integers(170, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    fg = tuple(int(np.clip(v + rng.integers(-35, 36), 0, 255)) for v in colour)
    if rng.random() < 0.5:  # distractor in a random colour
        x, y = rng.integers(0, size, 2)
        draw.rectangle([int(x), int(y), int(x) + size // 6, int(y) + size // 6],
                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    lo, hi = rng.integers(size // 10, size // 3, 2), rng.integers(2 * size // 3, size - size // 10, 2)
    box = [int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])]
    if shape == "ellipse":
        draw.ellipse(box, fill=fg)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fg)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fg)
    else:
        step = int(rng.integers(size // 12, size // 6)) + 1
        for k in range(int(rng.integers(0, step)), size, 2 * step):
            draw.rectangle([0, k, size, k + step - 1] if shape == "hstripes" else [k, 0, k + step - 1, size],
                           fill=fg)
    ox, oy = rng.integers(0, size, 2)
    arr = np.asarray(img, dtype=np.int16) + noise[oy:oy + size, ox:ox + size]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def synthesize(out_dir: Path, items: int = 2000, seed: int = 0, test_fraction: float = 0.1,
               missing_image_fraction: float = 0.01, image_size: int = 96) -> dict:
    """Write a catalogue to out_dir; return a summary dict {train_items, test_items, classes, missing_images, seconds}."""
    if items < 1 or seed < 0:
        raise PipelineError(f"a synthetic catalogue needs 1 item or more and a seed of 0 or more, not items={items}, "
                            f"seed={seed}")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    n_test = int(round(items * test_fraction))
    n_train = items - n_test
    labels = np.concatenate([rng.permutation(np.repeat(CODES, _quota(n_train, 3))),
                             rng.permutation(np.repeat(CODES, _quota(n_test, 0)))])
    ids = np.unique(rng.integers(100_000_000, 4_000_000_000, size=3 * items + 16))
    ids = rng.permutation(ids)[:2 * items]  # distinct 9-10 digit ids; collisions are vanishingly rare
    productids, imageids = ids[:items], ids[items:]
    missing = np.zeros(items, dtype=bool)
    missing[rng.choice(items, int(round(items * missing_image_fraction)), replace=False)] = True
    titles = [_title(rng, int(c)) for c in labels]
    descriptions = [_description(rng, int(c)) for c in labels]
    noise = rng.integers(-12, 13, size=(2 * image_size, 2 * image_size, 3)).astype(np.int16)

    header = ["", "designation", "description", "productid", "imageid"]
    for split, lo, hi in (("train", 0, n_train), ("test", n_train, items)):
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(out_dir / f"X_{split}.csv", header,
                   ([i, titles[i], descriptions[i], int(productids[i]), int(imageids[i])] for i in range(lo, hi)))
        image_dir = out_dir / f"image_{split}"
        image_dir.mkdir(exist_ok=True)
        for i in range(lo, hi):
            img = _image(rng, int(labels[i]), image_size, noise)  # drawn even when missing: stable stream
            if not missing[i]:
                img.save(image_dir / f"image_{imageids[i]}_product_{productids[i]}.jpg", "JPEG", quality=85)
    _write_csv(out_dir / "Y_train.csv", ["", "prdtypecode"], ([i, int(labels[i])] for i in range(n_train)))
    return {"train_items": n_train, "test_items": n_test, "classes": len(set(labels[:n_train].tolist())),
            "missing_images": int(missing.sum()), "seconds": round(time.perf_counter() - start, 3)}
