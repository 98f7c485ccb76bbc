"""Contact sheets (cmkg.data.sheet, `cmkg data show`) of tiny synthetic datasets."""

import numpy as np
import pytest
import scipy.ndimage as ndimage
from PIL import Image

from cmkg import synth
from cmkg.data import DatasetWriter, read_split, sheet, synthesize
from cmkg.errors import UserError

SIZE = 32


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """stb-like (12 sequences x 2 frames: 18 train, 2 val, 4 test), rhd-like (10 samples) and
    an RGB-only set laid out as the STB converter writes it."""
    tmp = tmp_path_factory.mktemp("sheet")
    synthesize(tmp / "stb", "stb-like", 24, SIZE, progress=False)
    synthesize(tmp / "rhd", "rhd-like", 10, SIZE, progress=False)
    batch = synth.render_range("rhd-like", 0, SIZE, 0, 3)
    with DatasetWriter(tmp / "real", {"converter": "test", "dataset": "stb"}, SIZE,
                       with_depth=False) as w:
        w.add("test", batch, ids=np.array([0, 10_001, 30_002]))  # B1Counting 0, B1Random 1, ...
    return tmp


def tiles(png):
    """(x, y, width, height) of every tile found in the PNG: the connected regions of
    non-background pixels as tall as a panel (a tile's three panels touch; captions are text)."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    labels, _ = ndimage.label((img < 250).any(-1), structure=np.ones((3, 3)))
    boxes = [(s[1].start, s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start)
             for s in ndimage.find_objects(labels)]
    return img, sorted((b for b in boxes if b[3] >= sheet.PANEL // 2), key=lambda b: (b[1], b[0]))


def test_one_tile_per_sample_in_a_grid(datasets, tmp_path):
    out = tmp_path / "sheet.png"
    got = sheet.contact_sheet(datasets / "stb", out, n=7)
    # 7 tiles in rows of COLUMNS = 4: 2 rows, GAP px between tiles and around the sheet
    width = 4 * 3 * sheet.PANEL + 5 * sheet.GAP
    height = 2 * (sheet.PANEL + sheet.CAPTION) + 3 * sheet.GAP
    img, found = tiles(out)
    assert got.size == (width, height) == sheet.sheet_size(7) and img.shape[:2] == (height, width)
    assert found == [(*sheet.tile_origin(i), 3 * sheet.PANEL, sheet.PANEL) for i in range(7)]
    assert found[4][:2] == (sheet.GAP, 2 * sheet.GAP + sheet.PANEL + sheet.CAPTION)  # row 2
    # spread over the splits in order; each tile's RGB panel is its sample, scaled up
    assert got.splits == ["train"] * 5 + ["val", "test"]
    k = sheet.PANEL // SIZE
    centres = np.arange(SIZE) * k + k // 2
    for i, (split, sample_id) in enumerate(zip(got.splits, got.ids)):
        data = read_split(datasets / "stb", split, ["id", "rgb"])
        rgb = data["rgb"][list(data["id"]).index(sample_id)]
        x, y = sheet.tile_origin(i)
        shown = img[y + centres][:, x + centres]
        assert np.abs(shown - rgb).mean() < 1.0, (i, split, sample_id)


def test_n_and_the_image_size(datasets, tmp_path):
    for n, rows, cols in [(1, 1, 1), (3, 1, 3), (4, 1, 4), (5, 2, 4)]:
        got = sheet.contact_sheet(datasets / "stb", tmp_path / f"{n}.png", split="train", n=n)
        w, h = 3 * sheet.PANEL, sheet.PANEL + sheet.CAPTION
        assert got.size == (cols * w + (cols + 1) * sheet.GAP, rows * h + (rows + 1) * sheet.GAP)
        assert Image.open(got.out).size == got.size
        assert len(tiles(got.out)[1]) == n == len(got.captions) == len(set(got.ids))
    # more than the split holds: all of it, once
    got = sheet.contact_sheet(datasets / "stb", tmp_path / "all.png", split="val", n=32)
    assert got.ids == [110_000, 110_001] and len(tiles(got.out)[1]) == 2


def test_captions_name_domain_sequence_and_split(datasets, tmp_path):
    got = sheet.contact_sheet(datasets / "stb", tmp_path / "a.png", split="test")
    assert got.ids == [0, 1, 10_000, 10_001]  # B1Counting and B1Random, 2 frames each
    assert got.captions == [
        "stb-like | test | id 0\nsequence B1Counting, frame 0",
        "stb-like | test | id 1\nsequence B1Counting, frame 1",
        "stb-like | test | id 10000\nsequence B1Random, frame 0",
        "stb-like | test | id 10001\nsequence B1Random, frame 1"]
    got = sheet.contact_sheet(datasets / "rhd", tmp_path / "b.png", n=3)
    assert got.captions == ["rhd-like | train | id 0", "rhd-like | train | id 4",
                            "rhd-like | test | id 9"]  # no sequences: one line
    got = sheet.contact_sheet(datasets / "real", tmp_path / "c.png")  # no depth: a grey panel
    assert got.captions == ["stb | test | id 0\nsequence B1Counting, frame 0",
                            "stb | test | id 10001\nsequence B1Random, frame 1",
                            "stb | test | id 30002\nsequence B2Random, frame 2"]
    assert len(tiles(got.out)[1]) == 3


def test_joints_are_drawn_where_they_project(datasets):
    data = read_split(datasets / "stb", "test", ["joints3d", "joints2d", "K"])
    for j3, j2, K in zip(data["joints3d"], data["joints2d"], data["K"]):
        np.testing.assert_allclose(sheet.project(j3.astype(np.float64), K), j2, atol=1e-3)


def test_bad_input_names_the_argument(datasets, tmp_path, capsys):
    from cmkg import cli

    out = tmp_path / "s.png"
    with pytest.raises(UserError, match=r"^DATASET .*nowhere: no such folder"):
        sheet.contact_sheet(tmp_path / "nowhere", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^DATASET .*empty: not a dataset folder"):
        sheet.contact_sheet(tmp_path / "empty", out)
    with pytest.raises(UserError, match=r"^--split tran: unknown split; this dataset has "
                       r"train, val, test"):
        sheet.contact_sheet(datasets / "stb", out, split="tran")
    with pytest.raises(UserError, match=r"^--split train: the split is empty"):
        sheet.contact_sheet(datasets / "real", out, split="train")
    for n in (0, -3):
        with pytest.raises(UserError, match=rf"^--n {n}: the number of samples must be >= 1"):
            sheet.contact_sheet(datasets / "stb", out, n=n)
    assert not out.exists()
    assert cli.main(["data", "show", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "DATASET" in capsys.readouterr().err and not out.exists()
    assert cli.main(["data", "show", str(datasets / "stb"), "--split", "val", "--n", "1",
                     "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{out}: 1 samples (1 val), {3 * sheet.PANEL + 2 * sheet.GAP}x"
        f"{sheet.PANEL + sheet.CAPTION + 2 * sheet.GAP} px")
    assert Image.open(out).size == sheet.sheet_size(1)
