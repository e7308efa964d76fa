"""Ranked-list pictures (size, borders, text) and the per-query ranking behind worst/best selection."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ccafl_hf.evaluation import compute_reid_metrics
from ccafl_hf.evaluation.visualization import (
    BACKGROUND,
    MATCH_COLOUR,
    MISMATCH_COLOUR,
    NEUTRAL_COLOUR,
    QUERY_COLOUR,
    RankedListLayout,
    RankedRow,
    rank_gallery,
    save_ranked_list,
    save_worst_and_best,
    select_queries,
)


@pytest.fixture
def solid_images(tmp_path):
    """Eight solid-colour images of assorted sizes."""
    paths = []
    for i in range(8):
        path = tmp_path / f"img_{i}.png"
        Image.new("RGB", (20 + 3 * i, 50 + 5 * i), (30 * i, 255 - 30 * i, 100)).save(path)
        paths.append(str(path))
    return paths


def test_picture_has_the_expected_size_and_borders(solid_images, tmp_path):
    layout = RankedListLayout(thumb_size=(64, 32), border=3, spacing=2, separator=10, text_height=12)
    rows = [
        RankedRow(solid_images[0], solid_images[1:4], [0.9, 0.8, 0.7], [True, False, True], caption="AP 0.83"),
        RankedRow(solid_images[4], solid_images[5:8], [0.6, 0.5, 0.4]),  # identities unknown
    ]
    path = save_ranked_list(tmp_path / "pics" / "ranked.png", rows, layout)
    picture = Image.open(path)
    assert picture.format == "PNG" and picture.mode == "RGB"
    cell_w, cell_h = 32 + 2 * 3, 64 + 2 * 3 + 12
    assert picture.size == (2 * 2 + 4 * cell_w + 3 * 2 + 10, 2 * 2 + 2 * cell_h + 2)
    assert picture.size == layout.picture_size(2, 3)

    pixels = np.asarray(picture)
    expected = [[QUERY_COLOUR, MATCH_COLOUR, MISMATCH_COLOUR, MATCH_COLOUR],
                [QUERY_COLOUR, NEUTRAL_COLOUR, NEUTRAL_COLOUR, NEUTRAL_COLOUR]]
    for r, colours in enumerate(expected):
        for c, colour in enumerate(colours):
            x, y = layout.cell_origin(r, c)
            assert tuple(pixels[y + 1, x + 1]) == colour  # top-left of the border
            assert tuple(pixels[y + 64 + 4, x + 32 + 4]) == colour  # bottom-right of the border
            text_band = pixels[y + 64 + 6: y + cell_h, x: x + cell_w]
            assert (text_band != BACKGROUND).any(), "score / caption text is drawn"
    # thumbnails keep their aspect ratio: the solid colour of gallery image 1 fills the middle of its cell
    x, y = layout.cell_origin(0, 1)
    assert tuple(pixels[y + 3 + 32, x + 3 + 16]) == (30, 225, 100)


def test_short_rows_leave_blank_cells(solid_images):
    from ccafl_hf.evaluation.visualization import render_ranked_list

    layout = RankedListLayout()
    picture = render_ranked_list([RankedRow(solid_images[0], solid_images[1:2], [0.5])], layout, num_matches=4)
    assert picture.size == layout.picture_size(1, 4)
    x, y = layout.cell_origin(0, 4)
    assert tuple(np.asarray(picture)[y + 1, x + 1]) == BACKGROUND
    with pytest.raises(ValueError, match="2 scores for 1 gallery paths"):
        RankedRow(solid_images[0], solid_images[1:2], [0.5, 0.4])


def _reid_problem(seed=0, num_q=12, num_g=40, dim=8):
    g = torch.Generator().manual_seed(seed)
    q_pids = torch.arange(num_q) % 6 + 1
    g_pids = torch.randint(0, 7, (num_g,), generator=g)
    q_cams = torch.randint(0, 3, (num_q,), generator=g)
    g_cams = torch.randint(0, 3, (num_g,), generator=g)
    centres = torch.randn(8, dim, generator=g)
    qf = F.normalize(centres[q_pids] + 0.8 * torch.randn(num_q, dim, generator=g), dim=1)
    gf = F.normalize(centres[g_pids] + 0.8 * torch.randn(num_g, dim, generator=g), dim=1)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def test_rank_gallery_agrees_with_the_metrics_and_the_protocol():
    qf, gf, q_pids, g_pids, q_cams, g_cams = _reid_problem()
    ranking = rank_gallery(qf, gf, q_pids, g_pids, q_cams, g_cams, k=5, chunk_size=5)
    metrics = compute_reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams)
    ap = ranking.average_precision
    assert ap[torch.isfinite(ap)].mean().item() == pytest.approx(metrics["mAP"], abs=1e-9)
    assert int(torch.isfinite(ap).sum()) == metrics["num_valid_queries"]
    for q in range(len(q_pids)):
        # slow, obvious: drop same identity + same camera, sort by similarity
        keep = ~((g_pids == q_pids[q]) & (g_cams == q_cams[q]))
        candidates = keep.nonzero().squeeze(1)
        sims = gf[candidates] @ qf[q]
        order = candidates[torch.sort(sims, descending=True, stable=True).indices]
        assert ranking.indices[q].tolist() == order[:5].tolist()
        assert ranking.matches[q].tolist() == (g_pids[order[:5]] == q_pids[q]).tolist()
        torch.testing.assert_close(ranking.scores[q], gf[order[:5]] @ qf[q])
        positives = (g_pids[order] == q_pids[q]).double()
        if positives.sum() == 0:
            assert math.isnan(ap[q])
        else:
            precision = positives.cumsum(0) / torch.arange(1, len(order) + 1)
            assert ap[q].item() == pytest.approx(float((precision * positives).sum() / positives.sum()))


def test_select_queries_worst_and_best():
    ap = torch.tensor([0.5, math.nan, 0.1, 0.9, 0.1, 0.7], dtype=torch.float64)
    assert select_queries(ap, 3, "worst").tolist() == [2, 4, 0]
    assert select_queries(ap, 2, "best").tolist() == [3, 5]
    assert select_queries(ap, 10, "best").numel() == 5  # NaN never picked
    with pytest.raises(ValueError, match="'worst' or 'best'"):
        select_queries(ap, 1, "median")


def test_save_worst_and_best(solid_images, tmp_path):
    qf, gf, q_pids, g_pids, q_cams, g_cams = _reid_problem(num_q=4, num_g=8)
    ranking = rank_gallery(qf, gf, q_pids, g_pids, q_cams, g_cams, k=3)
    layout = RankedListLayout(thumb_size=(32, 16))
    written = save_worst_and_best(tmp_path / "lists", ranking, solid_images[:4], solid_images, num=2, layout=layout)
    num_valid = int(torch.isfinite(ranking.average_precision).sum())
    for which in ("worst", "best"):
        assert Image.open(written[which]).size == layout.picture_size(min(2, num_valid), 3)
    summary = json.loads(written["summary"].read_text())
    worst_ap = [entry["average_precision"] for entry in summary["worst"]]
    assert worst_ap == sorted(worst_ap) and len(summary["best"][0]["matches"]) == 3
