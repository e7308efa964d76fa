"""Retrieval: feature files, embedding, faiss indexes (exact and IVF), search, the retrieval CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ccafl_hf.commands.retrieval import retrieval_main
from ccafl_hf.retrieval import (
    FeatureSet,
    RetrievalError,
    build_index,
    embed_folder,
    embed_split,
    eval_transform_for,
    index_recall,
    list_images,
    load_index,
    load_reid_model,
    save_index,
    search,
    search_gallery,
)


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def brute_force(queries: torch.Tensor, gallery: torch.Tensor, k: int):
    scores = queries @ gallery.T
    top = torch.topk(scores, k, dim=1)
    return top.values.numpy(), top.indices.numpy()


@pytest.fixture
def image_folders(tmp_path):
    """12 distinct pictures in gallery/ (two sub-folders); queries/ holds exact copies of 4 of them."""
    rng = np.random.default_rng(0)
    gallery = tmp_path / "gallery"
    for i in range(12):
        folder = gallery / ("cam_a" if i % 2 else "cam_b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(40, 20, 3), dtype=np.uint8)
        pixels[: 8 + 2 * i] = rng.integers(0, 256, size=3, dtype=np.uint8)  # a distinct solid band per image
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")
    queries = tmp_path / "queries"
    queries.mkdir()
    picked = sorted(gallery.rglob("*.png"))[1::3]
    for path in picked:
        shutil.copy(path, queries / f"copy_of_{path.parent.name}_{path.name}")
    return gallery, queries, picked


def test_feature_set_round_trip(tmp_path):
    features = FeatureSet.from_paths(
        unit_rows(5, 8, 0), [tmp_path / "a" / f"{i}.jpg" for i in range(4)] + [tmp_path / "b" / "x.jpg"],
        camids=[0, 1, 0, 1, 2], pids=[3, 3, 4, 4, 0], metadata={"model": "m", "flip": False},
    )
    assert features.root == str(tmp_path) and features.paths[0] == "a/0.jpg" and features.paths[-1] == "b/x.jpg"
    loaded = FeatureSet.load(features.save(tmp_path / "out" / "f.safetensors"))
    assert torch.equal(loaded.features, features.features)
    assert loaded.paths == features.paths and loaded.root == features.root
    assert loaded.camids.tolist() == [0, 1, 0, 1, 2] and loaded.pids.tolist() == [3, 3, 4, 4, 0]
    assert loaded.metadata == {"model": "m", "flip": "False"}
    assert loaded.absolute_paths()[-1] == str(tmp_path / "b" / "x.jpg")
    without_labels = FeatureSet(unit_rows(2, 3, 1), ["p", "q"])
    assert FeatureSet.load(without_labels.save(tmp_path / "g.safetensors")).pids is None


def test_feature_set_errors(tmp_path):
    with pytest.raises(RetrievalError, match="no such features file"):
        FeatureSet.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RetrievalError, match="bad.safetensors"):
        FeatureSet.load(tmp_path / "bad.safetensors")
    with pytest.raises(RetrievalError, match="one path per row"):
        FeatureSet(unit_rows(3, 4, 0), ["a", "b"])
    with pytest.raises(RetrievalError, match="pids has 2 entries"):
        FeatureSet(unit_rows(3, 4, 0), ["a", "b", "c"], pids=[1, 2])


def test_flat_index_search_is_exact_cosine():
    gallery, queries = unit_rows(300, 16, 0), unit_rows(7, 16, 1)
    index = build_index(gallery)
    scores, indices = search(index, queries, k=5)
    expected_scores, expected_indices = brute_force(queries, gallery, 5)
    assert np.array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    scores, indices = search(index, queries[:1], k=1000)  # k clipped to the gallery
    assert indices.shape == (1, 300) and sorted(indices[0].tolist()) == list(range(300))

    pids, camids = torch.arange(300) // 3, torch.arange(300) % 4
    named = FeatureSet(gallery, [f"g/{i}.jpg" for i in range(300)], "/data", camids=camids, pids=pids)
    query_set = FeatureSet(queries, [f"q{i}.jpg" for i in range(7)], "/queries", pids=torch.arange(7))
    results = search_gallery(build_index(named), named, query_set, k=3)
    assert [r.query for r in results] == [f"/queries/q{i}.jpg" for i in range(7)]
    for result, row in zip(results, expected_indices):
        assert result.pid == int(query_set.pids[results.index(result)])
        assert [m.path for m in result.matches] == [f"/data/g/{j}.jpg" for j in row[:3]]
        assert [(m.pid, m.camid) for m in result.matches] == [(j // 3, j % 4) for j in row[:3].tolist()]


def test_search_rejects_bad_inputs():
    index = build_index(unit_rows(10, 4, 0))
    with pytest.raises(RetrievalError, match="dimension 5 but the index holds 4-d"):
        search(index, unit_rows(2, 5, 0), k=3)
    with pytest.raises(RetrievalError, match="k must be >= 1"):
        search(index, unit_rows(2, 4, 0), k=0)
    with pytest.raises(RetrievalError, match="'flat' or 'ivf'"):
        build_index(unit_rows(10, 4, 0), kind="hnsw")
    with pytest.raises(RetrievalError, match="empty gallery"):
        build_index(torch.zeros(0, 4))


def test_ivf_recall_is_measured_against_exact(tmp_path):
    centres = unit_rows(20, 32, 0)
    assign = torch.randint(0, 20, (2000,), generator=torch.Generator().manual_seed(1))
    gallery = F.normalize(centres[assign] + 0.15 * unit_rows(2000, 32, 2), dim=1)
    queries = F.normalize(centres[:10] + 0.15 * unit_rows(10, 32, 3), dim=1)

    full = build_index(gallery, "ivf", nlist=16, nprobe=16)  # every list visited: exact
    assert index_recall(full, gallery, queries, k=10) == 1.0
    assert np.array_equal(search(full, queries, 10)[1], brute_force(queries, gallery, 10)[1])

    narrow = build_index(gallery, "ivf", nlist=64, nprobe=1)
    recall = index_recall(narrow, gallery, queries, k=10)
    _, approx = search(narrow, queries, 10)
    _, exact = brute_force(queries, gallery, 10)
    by_hand = np.mean([len(set(a.tolist()) & set(e.tolist())) / 10 for a, e in zip(approx, exact)])
    assert recall == pytest.approx(by_hand) and 0.0 < recall < 1.0
    assert 0.0 < index_recall(narrow, gallery, k=10, num_queries=50) <= 1.0  # sampled gallery vectors

    path = save_index(narrow, tmp_path / "idx" / "gallery.faiss")
    loaded = load_index(path, use_gpu=False)
    assert loaded.ntotal == 2000
    assert np.array_equal(search(loaded, queries, 10)[1], approx)  # nprobe travels with the file
    with pytest.raises(RetrievalError, match="no such index file"):
        load_index(tmp_path / "missing.faiss")
    with pytest.raises(RetrievalError, match="nlist must be between 1"):
        build_index(gallery[:10], "ivf", nlist=20)


def test_embed_index_search_finds_the_copies(image_folders, tiny_model, tmp_path):
    gallery_dir, query_dir, picked = image_folders
    model, processor = tiny_model
    gallery = embed_folder(model, gallery_dir, processor, batch_size=5, progress=False)
    queries = embed_folder(model, query_dir, processor, batch_size=3, progress=False)
    assert len(gallery) == 12 and gallery.dim == model.reid_feature_dim
    assert gallery.paths[0] == "cam_a/img_01.png" and gallery.root == str(gallery_dir)

    # the features are the model's own features of the test-time transform of each file
    transform = eval_transform_for(model, processor)
    files = list_images(gallery_dir)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in files])
    with torch.no_grad():
        torch.testing.assert_close(gallery.features, model.get_reid_features(pixels), atol=1e-5, rtol=0)

    gallery = FeatureSet.load(gallery.save(tmp_path / "gallery.safetensors"))
    index = load_index(save_index(build_index(gallery), tmp_path / "gallery.faiss"))
    results = search_gallery(index, gallery, queries, k=4)
    expected_scores, expected_indices = brute_force(queries.features, gallery.features, 4)
    for result, path, row_scores, row_indices in zip(results, sorted(picked, key=lambda p: f"{p.parent.name}_{p.name}"),
                                                     expected_scores, expected_indices):
        assert result.matches[0].path == str(path)  # its own copy, similarity 1
        assert result.matches[0].score == pytest.approx(1.0, abs=1e-5)
        assert [m.index for m in result.matches] == row_indices.tolist()
        np.testing.assert_allclose([m.score for m in result.matches], row_scores, atol=1e-5)
    with pytest.raises(RetrievalError, match="rebuild the index"):
        search_gallery(build_index(gallery.features[:5]), gallery, queries)


def test_embed_split_stores_labels(small_synthetic, tiny_model):
    dataset, _ = small_synthetic
    model, processor = tiny_model
    query = embed_split(model, dataset["query"], processor, progress=False, batch_size=64)
    assert len(query) == len(dataset["query"])
    assert query.pids.tolist() == dataset["query"]["pid"][:] and query.camids.tolist() == dataset["query"]["camid"][:]
    assert query.absolute_paths() == dataset["query"]["image_path"][:]


def test_load_reid_model_errors(tmp_path):
    with pytest.raises(RetrievalError, match="no such model folder"):
        load_reid_model(tmp_path / "nothing_here")
    with pytest.raises(RetrievalError, match="no config.json"):
        load_reid_model(tmp_path)
    with pytest.raises(RetrievalError, match="not in the local Hub cache"):
        load_reid_model("some-org/ccafl-model-that-is-not-cached")


def test_retrieval_cli_embed_index_search(image_folders, saved_tiny, tmp_path, capsys):
    gallery_dir, query_dir, picked = image_folders
    gallery_file, index_file = tmp_path / "g.safetensors", tmp_path / "g.faiss"
    common = ["--model", str(saved_tiny), "--no_progress"]
    assert retrieval_main(["embed", *common, "--images", str(gallery_dir), "--output", str(gallery_file)]) == 0
    assert retrieval_main(["index", "--features", str(gallery_file), "--output", str(index_file),
                           "--kind", "ivf", "--nlist", "2", "--nprobe", "2", "--recall_k", "3"]) == 0
    assert "recall@3 against exact search: 1.0000" in capsys.readouterr().out
    out_json = tmp_path / "results.json"
    assert retrieval_main(["search", *common, "--gallery", str(gallery_file), "--index", str(index_file),
                           "--query_images", str(query_dir), "--k", "3", "--output", str(out_json),
                           "--save_ranked_lists", str(tmp_path / "pics"), "--num_lists", "2"]) == 0
    results = json.loads(out_json.read_text())
    assert len(results) == len(picked) and all(len(r["matches"]) == 3 for r in results)
    assert {r["matches"][0]["path"] for r in results} == {str(p) for p in picked}
    assert Image.open(tmp_path / "pics" / "search.png").size[0] > 0

    capsys.readouterr()
    assert retrieval_main(["search", "--gallery", str(tmp_path / "none.safetensors"),
                           "--queries", str(gallery_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none.safetensors" in err[0]


@pytest.mark.parametrize("command", ["embed", "search"])
def test_missing_image_folder_is_reported_before_the_model_loads(command, tmp_path, capsys, monkeypatch):
    import ccafl_hf.commands.retrieval as retrieval_command

    def no_model(args):
        raise AssertionError("the model was loaded before the image folder was checked")

    monkeypatch.setattr(retrieval_command, "load_model_from_args", no_model)
    missing = tmp_path / "no-such-images"
    argv = (["embed", "--images", str(missing), "--output", str(tmp_path / "f.safetensors")] if command == "embed"
            else ["search", "--gallery", str(tmp_path / "g.safetensors"), "--query_images", str(missing)])
    if command == "search":
        from ccafl_hf.retrieval import FeatureSet

        FeatureSet(torch.eye(2), ["a.jpg", "b.jpg"]).save(tmp_path / "g.safetensors")
    assert retrieval_main([*argv, "--model", "outputs/unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such image folder" in err[0], err
