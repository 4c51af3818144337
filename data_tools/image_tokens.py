"""Image sizes and the image tokens they would take, for `data_tools.stats`: under `pad` (LLaVA-1.5, one
tower-sized view, (tower / patch)^2 tokens whatever the size) and under `anyres` (LLaVA-NeXT's tiles +
overview, `llava_tiny.anyres`), so `model_max_length` and `--image_grid_pinpoints` can be chosen before
training."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from .token_lengths import length_summary

# Width / height bins: tall strips, portrait, about square, landscape, wide strips.
ASPECT_BINS = ((0.25, "<1:4"), (0.5, "1:4-1:2"), (0.8, "1:2-4:5"), (1.25, "4:5-5:4"), (2.0, "5:4-2:1"),
               (4.0, "2:1-4:1"), (float("inf"), ">4:1"))


@dataclass(frozen=True)
class ImageTokenSettings:
    """The tower's image size and patch size, and the anyres pinpoints ([height, width] pairs) when asked for."""

    tower_size: int = 336
    patch_size: int = 14
    pinpoints: tuple[tuple[int, int], ...] | None = None

    @property
    def pad_tokens(self) -> int:
        return (self.tower_size // self.patch_size) ** 2

    def anyres_tokens(self, width: int, height: int) -> int:
        return _anyres_tokens(width, height, self.pinpoints, self.tower_size, self.patch_size)

    def anyres_grid(self, width: int, height: int) -> str:
        from llava_tiny.anyres import tile_grid

        rows, cols = tile_grid(width, height, [list(p) for p in self.pinpoints], self.tower_size)
        return f"{rows}x{cols}"


@lru_cache(maxsize=None)  # a data set has few distinct sizes and many images
def _anyres_tokens(width, height, pinpoints, tower_size, patch_size) -> int:
    from llava_tiny.anyres import anyres_num_image_tokens  # imports torch: only when anyres is asked for

    return anyres_num_image_tokens(width, height, [list(p) for p in pinpoints], tower_size, patch_size)


def settings_from_args(args, parser) -> ImageTokenSettings:
    """`--tower-size`, `--patch-size` and `--image-grid-pinpoints` (either LLaVA-NeXT form) as settings; unusable
    ones end the command with the parser's usage and what was wrong (exit 2)."""
    from llava_tiny.anyres import PinpointsError, parse_grid_pinpoints

    if args.tower_size <= 0 or args.patch_size <= 0 or args.tower_size % args.patch_size:
        parser.error(f"--tower-size {args.tower_size} --patch-size {args.patch_size}: expected positive sizes, "
                     "the tower size a multiple of the patch size")
    pinpoints = None
    if args.image_grid_pinpoints:
        try:
            pinpoints = tuple(tuple(p) for p in parse_grid_pinpoints(args.image_grid_pinpoints, args.tower_size))
        except PinpointsError as error:
            parser.error(str(error))
    return ImageTokenSettings(args.tower_size, args.patch_size, pinpoints)


def add_image_token_arguments(parser) -> None:
    parser.add_argument("--tower-size", type=int, default=336,
                        help="with --image-folder: the vision tower's image size in pixels (default 336)")
    parser.add_argument("--patch-size", type=int, default=14, help="the vision tower's patch size (default 14)")
    parser.add_argument("--image-grid-pinpoints", "--image_grid_pinpoints", default=None,
                        help="also count anyres tokens per image: LLaVA-NeXT's list, e.g. "
                             "'[[336,672],[672,336],[672,672]]', or range, e.g. '(1x1),...,(3x3)'")


def aspect_bin(width: int, height: int) -> str:
    ratio = width / height
    return next(label for upper, label in ASPECT_BINS if ratio < upper)


def image_size_summary(sizes: list[tuple[int, int]], settings: ImageTokenSettings) -> dict:
    """Widths, heights and aspect ratios of images (one entry per distinct file), and the tokens each takes under
    `pad` and, with pinpoints, under `anyres` (summary and how many images get each tile grid)."""
    summary = {"widths": length_summary([w for w, _ in sizes]), "heights": length_summary([h for _, h in sizes]),
               "aspect_ratios": dict(Counter(aspect_bin(w, h) for w, h in sizes).most_common()),
               "image_tokens": {"tower_size": settings.tower_size, "patch_size": settings.patch_size,
                                "pad": settings.pad_tokens}}
    if settings.pinpoints and sizes:
        summary["image_tokens"].update(
            pinpoints=[list(p) for p in settings.pinpoints],
            anyres=length_summary([settings.anyres_tokens(w, h) for w, h in sizes]),
            anyres_grids=dict(Counter(settings.anyres_grid(w, h) for w, h in sizes).most_common()))
    return summary


def anyres_sample_lengths(lengths: dict[int, int], paths: dict[int, list[str]], sizes: dict[str, tuple[int, int]],
                          settings: ImageTokenSettings, num_image_tokens: int) -> dict[int, int]:
    """Each sample's token length (measured with `num_image_tokens` per image) as it would be under anyres: each
    image's placeholders replaced by its anyres count. Samples with an unreadable image are left out."""
    anyres = {}
    for index, length in lengths.items():
        images = paths.get(index, [])
        if all(path in sizes for path in images):
            anyres[index] = length + sum(settings.anyres_tokens(*sizes[path]) - num_image_tokens for path in images)
    return anyres


def image_tokens_text(split: str, files: dict, anyres_lengths: dict | None) -> list[str]:
    """The lines `data_tools.stats` prints per split about image sizes and image tokens."""
    widths, heights, tokens = files["widths"], files["heights"], files["image_tokens"]
    if not widths["count"]:
        return []
    aspects = ", ".join(f"{label} {n}" for label, n in files["aspect_ratios"].items())
    lines = [f"{split} image sizes: width median {widths['median']} / p95 {widths['p95']} / max {widths['max']}, "
             f"height median {heights['median']} / p95 {heights['p95']} / max {heights['max']}; "
             f"width:height {aspects}",
             f"{split} image tokens: pad {tokens['pad']} each (tower {tokens['tower_size']} px, "
             f"patch {tokens['patch_size']})"]
    if "anyres" in tokens:
        anyres = tokens["anyres"]
        grids = ", ".join(f"{grid} {n}" for grid, n in tokens["anyres_grids"].items())
        lines[-1] += (f"; anyres median {anyres['median']} / p95 {anyres['p95']} / max {anyres['max']} "
                      f"(tile grids {grids})")
    if anyres_lengths:
        lines.append(f"{split} tokens per sample under anyres: median {anyres_lengths['median']} / "
                     f"p95 {anyres_lengths['p95']} / max {anyres_lengths['max']}")
    return lines
