"""HoVLE / InternVL image preprocessing (METHOD.md §1.5): dynamic tiling, ImageNet normalisation, image tokens.

An image of width W and height H becomes a grid of i x j tiles of S x S pixels (S = 448), i columns and j rows,
plus one S x S thumbnail of the whole image when i*j > 1:

* candidates: every (i, j) with min_num <= i*j <= max_num, in order of tile count;
* choice: the candidate whose i/j is closest to W/H; on an exact tie a later (larger) grid wins when
  W*H > 0.5 * S^2 * i*j;
* the image is resized (bicubic) to (S*i, S*j) and cut row by row into i*j tiles.

Each tile is then normalised with the ImageNet mean / std, so `load_image` returns (n_tiles, 3, S, S) float32.
In the prompt each image becomes `<img>` + `<IMG_CONTEXT>` x (tokens_per_tile * n_tiles) + `</img>`; the model
writes its image tokens at the `<IMG_CONTEXT>` positions (`MMMambaModel.embed`).

Tokenizer requirement: `<IMG_CONTEXT>` must be one token of the model's tokenizer and its id must equal
`config.img_context_token_id` (HoVLE / InternVL tokenizers have it; a plain text tokenizer does not, so add it
with `tokenizer.add_special_tokens` and resize the embeddings before using images).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .chat_prompt import internlm2_chat_prompt
from .vision import vision_settings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, sorted by tile count.

    Built as a set and then stably sorted, exactly as InternVL does: grids with the same tile count keep the
    set's iteration order, which decides ties between e.g. (1, 2) and (2, 1)."""
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"tile limits must satisfy 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], image_size: int = 448) -> tuple[int, int]:
    """The grid whose cols/rows is closest to width/height; exact ties go to the later grid if the image area
    exceeds half of that grid's pixel area."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def dynamic_tiles(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Cut `image` into the tiles of its closest grid (row-major), plus a thumbnail when there is more than one."""
    width, height = image.size
    cols, rows = closest_grid(width, height, candidate_grids(min_num, max_num), image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for t in range(cols * rows):
        x, y = (t % cols) * image_size, (t // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def normalize_tile(image: Image.Image, image_size: int = 448) -> torch.Tensor:
    """RGB, bicubic resize to image_size (no-op for tiles), /255, (x - mean) / std -> (3, S, S) float32."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    w, h = image.size
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)
    x = x.float().div(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def open_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """A PIL image in RGB; a clear error naming the file when it is missing or not an image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image file {path} could not be read as an image ({e})") from e


def load_image(
    image: str | os.PathLike | Image.Image,
    image_size: int = 448,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """Image file (or PIL image) -> pixel tiles (n_tiles, 3, image_size, image_size), float32, normalised."""
    tiles = dynamic_tiles(open_image(image), min_num, max_num, image_size, use_thumbnail)
    return torch.stack([normalize_tile(t, image_size) for t in tiles])


def expand_image_tokens(prompt: str, n_tiles: int, tokens_per_tile: int) -> str:
    """Replace the first `<image>` by `<img>` + `<IMG_CONTEXT>` x (tokens_per_tile * n_tiles) + `</img>`;
    without a placeholder, `"<image>\\n"` is prepended first (as InternVL does for the first user turn)."""
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = IMAGE_PLACEHOLDER + "\n" + prompt
    tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (tokens_per_tile * n_tiles) + IMG_END_TOKEN
    return prompt.replace(IMAGE_PLACEHOLDER, tokens, 1)


def tokens_per_tile(config) -> int:
    """(S / patch * downsample_ratio)^2: 256 for HoVLE's 448-pixel tiles, 14-pixel patches and ratio 0.5."""
    v = vision_settings(config.vision_config)
    return int((v["image_size"] // v["patch_size"] * v["downsample_ratio"]) ** 2)


def check_image_tokenizer(config, tokenizer) -> int:
    """Check that `<IMG_CONTEXT>` is a single token of `tokenizer` with id config.img_context_token_id."""
    want = getattr(config, "img_context_token_id", None)
    if want is None:
        raise ValueError("config field img_context_token_id is not set: this model cannot take images")
    tid = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = tokenizer(IMG_CONTEXT_TOKEN, add_special_tokens=False)["input_ids"]
    if tid is None or (tid == unk and tokenizer.unk_token != IMG_CONTEXT_TOKEN) or ids != [tid]:
        raise ValueError(
            f"the tokenizer has no {IMG_CONTEXT_TOKEN} token (it encodes to {ids}); image prompts need a tokenizer "
            f"in which {IMG_CONTEXT_TOKEN} is one token with id config.img_context_token_id = {want} "
            "(use the HoVLE / InternVL tokenizer saved with the model)"
        )
    if tid != want:
        raise ValueError(
            f"tokenizer id of {IMG_CONTEXT_TOKEN} is {tid} but config.img_context_token_id = {want}; "
            "the tokenizer does not belong to this model"
        )
    return tid


def build_image_prompt(
    config, tokenizer, image_path, prompt: str, max_tiles: int = 6, chat: bool = True
) -> tuple[str, torch.Tensor]:
    """(prompt text with expanded image tokens, pixel tiles (n, 3, S, S)) for one image and one question.

    With `chat`, the question is wrapped in the tokenizer's chat template or, for HoVLE models
    (config.template == "internlm2-chat"), in InternVL's internlm2-chat template; the `<image>` placeholder
    is expanded after templating, as InternVL's `chat()` does."""
    if getattr(config, "vision_config", None) is None:
        raise ValueError("this model has no vision front (config.vision_config is None); it cannot take --image")
    check_image_tokenizer(config, tokenizer)
    v = vision_settings(config.vision_config)
    max_num = max_tiles if v.get("dynamic_image_size", True) else 1
    pixel_values = load_image(
        image_path, v["image_size"], max_num=max_num, min_num=min(v.get("min_dynamic_patch", 1), max_num),
        use_thumbnail=v.get("use_thumbnail", True),
    )
    question = prompt if IMAGE_PLACEHOLDER in prompt else IMAGE_PLACEHOLDER + "\n" + prompt
    text = question
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    elif chat and getattr(config, "template", None) == "internlm2-chat":
        text = internlm2_chat_prompt(question)
    return expand_image_tokens(text, pixel_values.shape[0], tokens_per_tile(config)), pixel_values
