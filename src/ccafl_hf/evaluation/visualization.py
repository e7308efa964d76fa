"""Ranked-list pictures: for each query a row with the query and its top-k gallery images.

Gallery thumbnails get a green border when they show the query's identity, red when they do not,
and a neutral grey one when identities are unknown; the similarity score is written under each.
`rank_gallery` ranks a gallery for every query under the evaluation protocol (same identity *and*
camera removed) and gives each query's average precision, so `select_queries` can pick the worst
or best queries to look at.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..data import load_image
from ..data.images import ImageSource

logger = logging.getLogger(__name__)

Colour = tuple[int, int, int]
MATCH_COLOUR: Colour = (0, 170, 0)
MISMATCH_COLOUR: Colour = (220, 0, 0)
NEUTRAL_COLOUR: Colour = (160, 160, 160)
QUERY_COLOUR: Colour = (30, 30, 30)
BACKGROUND: Colour = (255, 255, 255)
TEXT_COLOUR: Colour = (0, 0, 0)


@dataclass(frozen=True)
class RankedListLayout:
    """Geometry of a ranked-list picture (pixels).

    Attributes:
        thumb_size: ``(height, width)`` of every thumbnail (images are fitted, aspect kept).
        border: border width around a thumbnail.
        spacing: gap between cells and rows, and the outer margin.
        separator: extra gap between the query and its first match.
        text_height: band under each thumbnail for the score / caption.
    """

    thumb_size: tuple[int, int] = (128, 64)
    border: int = 4
    spacing: int = 4
    separator: int = 12
    text_height: int = 14

    @property
    def cell_size(self) -> tuple[int, int]:
        """``(width, height)`` of one cell: bordered thumbnail plus its text band."""
        height, width = self.thumb_size
        return width + 2 * self.border, height + 2 * self.border + self.text_height

    def picture_size(self, num_rows: int, num_matches: int) -> tuple[int, int]:
        """``(width, height)`` of a picture of ``num_rows`` queries with ``num_matches`` matches each."""
        cell_w, cell_h = self.cell_size
        width = 2 * self.spacing + (num_matches + 1) * cell_w + num_matches * self.spacing + self.separator
        height = 2 * self.spacing + num_rows * cell_h + (num_rows - 1) * self.spacing
        return width, height

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        """Top-left ``(x, y)`` of the cell at ``row`` and ``column`` (0 = the query)."""
        cell_w, cell_h = self.cell_size
        x = self.spacing + column * (cell_w + self.spacing) + (self.separator if column > 0 else 0)
        y = self.spacing + row * (cell_h + self.spacing)
        return x, y


@dataclass
class RankedRow:
    """One query and its ranked matches.

    Attributes:
        query_path: query image file.
        gallery_paths: matched image files, best first.
        scores: their similarity scores.
        matches: per match, whether it shows the query's identity (``None``: unknown, neutral borders).
        caption: text under the query (e.g. ``"AP 0.42"``); default ``"query"``.
        query_image / gallery_images: what is drawn when the images are not files (a `load_image`
            source each, e.g. a 🤗 datasets image value); default: the files at the paths, which then
            only name the images.
    """

    query_path: str
    gallery_paths: Sequence[str]
    scores: Sequence[float]
    matches: Sequence[bool] | None = None
    caption: str | None = None
    query_image: ImageSource | None = None
    gallery_images: Sequence[ImageSource] | None = None

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.gallery_paths):
            raise ValueError(f"{len(self.scores)} scores for {len(self.gallery_paths)} gallery paths")
        if self.matches is not None and len(self.matches) != len(self.gallery_paths):
            raise ValueError(f"{len(self.matches)} match flags for {len(self.gallery_paths)} gallery paths")
        if self.gallery_images is not None and len(self.gallery_images) != len(self.gallery_paths):
            raise ValueError(f"{len(self.gallery_images)} gallery images for {len(self.gallery_paths)} gallery paths")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(size, 6))
    except (TypeError, ImportError, OSError):  # no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _draw_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, origin: tuple[int, int], image: ImageSource,
               name: str, colour: Colour, text: str, layout: RankedListLayout, font) -> None:
    x, y = origin
    height, width = layout.thumb_size
    cell_w, _ = layout.cell_size
    box_h = height + 2 * layout.border
    draw.rectangle((x, y, x + cell_w - 1, y + box_h - 1), fill=colour)
    draw.rectangle((x + layout.border, y + layout.border, x + layout.border + width - 1,
                    y + layout.border + height - 1), fill=BACKGROUND)
    thumb = ImageOps.contain(load_image(image, name=name), (width, height), Image.Resampling.BICUBIC)
    canvas.paste(thumb, (x + layout.border + (width - thumb.width) // 2, y + layout.border + (height - thumb.height) // 2))
    if text and layout.text_height > 0:
        draw.text((x + cell_w / 2, y + box_h + layout.text_height / 2), text, fill=TEXT_COLOUR, font=font, anchor="mm")


def render_ranked_list(rows: Sequence[RankedRow], layout: RankedListLayout | None = None,
                       num_matches: int | None = None) -> Image.Image:
    """The ranked-list picture of ``rows`` (one row per query): an RGB image of
    ``layout.picture_size(len(rows), num_matches)`` pixels, ``num_matches`` defaulting to the longest row."""
    layout = layout or RankedListLayout()
    if not rows:
        raise ValueError("no query to draw: rows is empty")
    k = max(len(r.gallery_paths) for r in rows) if num_matches is None else int(num_matches)
    canvas = Image.new("RGB", layout.picture_size(len(rows), k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.text_height - 3)
    for r, row in enumerate(rows):
        query = row.query_image if row.query_image is not None else row.query_path
        _draw_cell(canvas, draw, layout.cell_origin(r, 0), query, row.query_path, QUERY_COLOUR,
                   row.caption if row.caption is not None else "query", layout, font)
        gallery = row.gallery_images if row.gallery_images is not None else row.gallery_paths
        for c, (path, image, score) in enumerate(zip(row.gallery_paths[:k], gallery[:k], row.scores[:k]), start=1):
            if row.matches is None:
                colour = NEUTRAL_COLOUR
            else:
                colour = MATCH_COLOUR if row.matches[c - 1] else MISMATCH_COLOUR
            _draw_cell(canvas, draw, layout.cell_origin(r, c), image, path, colour, f"{score:.3f}", layout, font)
    return canvas


def save_ranked_list(path: str | os.PathLike, rows: Sequence[RankedRow], layout: RankedListLayout | None = None,
                     num_matches: int | None = None) -> Path:
    """Render ``rows`` (see `render_ranked_list`) and write the picture as a PNG to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_ranked_list(rows, layout, num_matches).save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------- ranking
@dataclass
class QueryRanking:
    """Per-query ranking of a gallery under the evaluation protocol.

    Attributes:
        average_precision: ``[Q]`` float64, AP of each query (NaN where the gallery holds no image of
            its identity from another camera: such queries are not evaluated).
        indices: ``[Q, k]`` gallery rows of the top-k, best first (``-1`` pads short rows).
        scores: ``[Q, k]`` their cosine similarities (``-inf`` on padding).
        matches: ``[Q, k]`` whether each shows the query's identity.
    """

    average_precision: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor
    matches: torch.Tensor


@torch.no_grad()
def rank_gallery(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    k: int = 10,
    chunk_size: int | None = None,
) -> QueryRanking:
    """Rank the gallery for every query by cosine similarity, as the evaluation does.

    ``query_features [Q, D]``, ``gallery_features [G, D]``, ids ``[Q]`` / ``[G]``. Gallery images of
    the query's identity *and* camera are removed (docs/method.md §1); ties keep gallery order. The mean
    of the finite ``average_precision`` is the mAP of `ccafl_hf.evaluation.compute_reid_metrics`.
    Queries are processed ``chunk_size`` at a time (default: ~256 MB of scratch).
    """
    qf = F.normalize(torch.as_tensor(query_features).float(), dim=1)
    gf = F.normalize(torch.as_tensor(gallery_features).float().to(qf.device), dim=1)
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"features must be [Q, D] and [G, D], got {tuple(qf.shape)} and {tuple(gf.shape)}")
    num_q, num_g = qf.shape[0], gf.shape[0]
    ids = [torch.as_tensor(x).to(qf.device, torch.int64).reshape(-1) for x in (q_pids, g_pids, q_camids, g_camids)]
    for name, value, n in zip(("q_pids", "g_pids", "q_camids", "g_camids"), ids, (num_q, num_g, num_q, num_g)):
        if value.numel() != n:
            raise ValueError(f"{name} has {value.numel()} entries, expected {n}")
    q_pid, g_pid, q_cam, g_cam = ids
    k = min(int(k), num_g)
    chunk = chunk_size or max(1, (256 * 2**20) // (max(num_g, 1) * 24))
    ap = torch.full((num_q,), math.nan, dtype=torch.float64, device=qf.device)
    indices = torch.full((num_q, k), -1, dtype=torch.int64, device=qf.device)
    scores = torch.full((num_q, k), -math.inf, dtype=torch.float32, device=qf.device)
    matches = torch.zeros((num_q, k), dtype=torch.bool, device=qf.device)
    ranks = torch.arange(1, num_g + 1, device=qf.device, dtype=torch.float64)
    for start in range(0, num_q, chunk):
        rows = slice(start, min(start + chunk, num_q))
        sim = qf[rows] @ gf.T  # [B, G]
        same_pid = q_pid[rows, None] == g_pid[None, :]
        same_cam = q_cam[rows, None] == g_cam[None, :]
        sim.masked_fill_(same_pid & same_cam, -math.inf)  # junk sorts last
        sorted_sim, order = torch.sort(sim, dim=1, descending=True, stable=True)
        positive = (same_pid & ~same_cam).gather(1, order)
        hits = positive.cumsum(1, dtype=torch.float64)
        num_pos = hits[:, -1] if num_g else hits.new_zeros(sim.shape[0])
        ap_rows = ((hits / ranks) * positive).sum(1) / num_pos
        ap[rows] = torch.where(num_pos > 0, ap_rows, torch.full_like(ap_rows, math.nan))
        valid = torch.isfinite(sorted_sim[:, :k])
        indices[rows] = torch.where(valid, order[:, :k], torch.full_like(order[:, :k], -1))
        scores[rows] = sorted_sim[:, :k]
        matches[rows] = same_pid.gather(1, order[:, :k]) & valid
    return QueryRanking(ap, indices, scores, matches)


def select_queries(average_precision: torch.Tensor, num: int, which: Literal["worst", "best"] = "worst") -> torch.Tensor:
    """Indices ``[<= num]`` of the ``num`` queries with the lowest (``"worst"``) or highest (``"best"``)
    AP, in that order; NaN (unevaluated) queries are never picked, ties keep query order."""
    if which not in ("worst", "best"):
        raise ValueError(f"which must be 'worst' or 'best', got {which!r}")
    ap = torch.as_tensor(average_precision, dtype=torch.float64).reshape(-1)
    candidates = torch.isfinite(ap).nonzero().squeeze(1)
    order = torch.sort(ap[candidates], descending=which == "best", stable=True).indices
    return candidates[order[: max(int(num), 0)]]


def ranked_rows(ranking: QueryRanking, selected: Sequence[int] | torch.Tensor, query_paths: Sequence[str],
                gallery_paths: Sequence[str], query_images: Sequence[ImageSource] | None = None,
                gallery_images: Sequence[ImageSource] | None = None) -> list[RankedRow]:
    """`RankedRow`s of the ``selected`` queries of ``ranking``, captioned with their AP.

    ``query_images`` / ``gallery_images`` (indexed like the paths, e.g. `split_image_sources`) are
    drawn instead of the files at the paths when given.
    """
    rows = []
    for q in torch.as_tensor(selected).tolist():
        keep = ranking.indices[q] >= 0
        idx = ranking.indices[q][keep].tolist()
        rows.append(RankedRow(
            query_paths[q], [gallery_paths[j] for j in idx], ranking.scores[q][keep].tolist(),
            ranking.matches[q][keep].tolist(), f"AP {float(ranking.average_precision[q]):.2f}",
            None if query_images is None else query_images[q],
            None if gallery_images is None else [gallery_images[j] for j in idx],
        ))
    return rows


def split_image_sources(split) -> Sequence[ImageSource]:
    """The images of a `load_reid_dataset` split, indexed like its rows: the values of its ``image``
    column where the split stores its images (the ``hf`` reader; read row by row, not all at once),
    else its ``image_path`` files."""
    columns = getattr(split, "column_names", None) or []
    if "image" in columns:
        return split["image"]
    if "image_path" not in columns:
        raise ValueError(f"the split needs an 'image' or 'image_path' column, got columns {columns}")
    return split["image_path"][:]


def save_worst_and_best(directory: str | os.PathLike, ranking: QueryRanking, query_paths: Sequence[str],
                        gallery_paths: Sequence[str], num: int = 10, layout: RankedListLayout | None = None, *,
                        query_images: Sequence[ImageSource] | None = None,
                        gallery_images: Sequence[ImageSource] | None = None) -> dict[str, Path]:
    """Write ``worst.png`` and ``best.png`` (``num`` queries each, by AP) and ``ranked_lists.json``
    (the pictured queries, their AP and matches) into ``directory``. Returns the written paths.

    ``query_images`` / ``gallery_images``: see `ranked_rows` (images not stored as files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    summary = {}
    for which in ("worst", "best"):
        selected = select_queries(ranking.average_precision, num, which)
        if selected.numel() == 0:
            logger.warning("no evaluated query: %s.png not written", which)
            continue
        rows = ranked_rows(ranking, selected, query_paths, gallery_paths, query_images, gallery_images)
        written[which] = save_ranked_list(directory / f"{which}.png", rows, layout, ranking.indices.shape[1])
        summary[which] = [
            {"query": r.query_path, "query_index": int(q), "average_precision": float(ranking.average_precision[q]),
             "matches": [{"path": p, "score": s, "same_identity": m}
                         for p, s, m in zip(r.gallery_paths, r.scores, r.matches)]}
            for q, r in zip(selected.tolist(), rows)
        ]
    written["summary"] = directory / "ranked_lists.json"
    written["summary"].write_text(json.dumps(summary, indent=2))
    return written


__all__ = [
    "MATCH_COLOUR",
    "MISMATCH_COLOUR",
    "NEUTRAL_COLOUR",
    "QUERY_COLOUR",
    "QueryRanking",
    "RankedListLayout",
    "RankedRow",
    "rank_gallery",
    "ranked_rows",
    "render_ranked_list",
    "save_ranked_list",
    "save_worst_and_best",
    "select_queries",
    "split_image_sources",
]
