"""The embedded benchmark's domain knobs (``data.*.knobs``, ``cmkg.synth.variant``): each is
deterministic, changes what it says, and enters a dataset's address only when set."""

import numpy as np
import pytest

from cmkg import config, synth
from cmkg.data.store import synth_source
from cmkg.errors import ConfigError

SIZE = 32


def _off_plane_pixels(r: dict) -> np.ndarray:
    """Per image, the number of background pixels (outside the hand's mask) whose depth is off
    the image's least-squares background plane by more than 15 mm: distractor pixels."""
    n, s = r["depth"].shape[:2]
    v, u = np.mgrid[0:s, 0:s]
    a = np.stack([np.ones(s * s), u.ravel(), v.ravel()], 1)
    out = []
    for i in range(n):
        bg = r["mask"][i].ravel() == 0
        z = r["depth"][i].ravel().astype(float)
        # robust plane: fit, drop the far-off pixels, fit again on the rest
        keep = bg.copy()
        for _ in range(3):
            coef, *_ = np.linalg.lstsq(a[keep], z[keep], rcond=None)
            res = np.abs(z - a @ coef)
            keep = bg & (res < max(15.0, np.percentile(res[bg], 50)))
        out.append(int((bg & (res > 15.0)).sum()))
    return np.array(out)


def test_fewer_distractors_fewer_distractor_pixels():
    plain = synth.render_range("rhd-like", 0, SIZE, 0, 64, knobs={"distractors": 0})
    busy = synth.render_range("rhd-like", 0, SIZE, 0, 64, knobs={"distractors": 8})
    default = synth.render_range("rhd-like", 0, SIZE, 0, 64)
    n_plain, n_busy, n_def = (_off_plane_pixels(r).sum() for r in (plain, busy, default))
    assert n_plain < 0.05 * n_def < n_def < n_busy


def test_knobs_are_deterministic_and_keep_the_stream():
    a = synth.render_range("rhd-like", 3, SIZE, 5, 40, knobs={"occluder_prob": 0.0})
    b = synth.render_range("rhd-like", 3, SIZE, 5, 40, knobs={"occluder_prob": 0.0})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # a knob changes the scene it says, not the hands: the variant keeps the domain's name,
    # so its poses come from the same random stream (skin-like distractors draw after them)
    c = synth.render_range("rhd-like", 3, SIZE, 5, 40, knobs={"skin_like_distractors": 0.0})
    plain = synth.render_range("rhd-like", 3, SIZE, 5, 40)
    np.testing.assert_array_equal(c["joints3d"], plain["joints3d"])
    assert not np.array_equal(c["rgb"], plain["rgb"])


def test_sequence_blocks_and_val():
    dom = synth.variant("stb-like", {"blocks": 8, "val": ["B8Counting", "B8Random"]})
    split = dom.sequences.split()
    assert split["test"] == ["B1Counting", "B1Random"]
    assert split["val"] == ["B8Counting", "B8Random"]
    assert len(split["train"]) == 12 and not set(split["train"]) & {"B1Random", "B8Random"}
    # the first sequences of a longer list are the named domain's sequences, frame for frame
    a = synth.render_range("stb-like", 1, SIZE, 0, 20, 10, knobs={"blocks": 8})
    b = synth.render_range("stb-like", 1, SIZE, 0, 20, 10)
    np.testing.assert_array_equal(a["rgb"], b["rgb"])


def test_sequence_test_knob():
    # a larger test split of unseen sequences (the cpu preset's: B1 and B31-B40); training
    # keeps every other sequence, in the same order, so its frames are the same
    dom = synth.variant("stb-like", {"blocks": 8, "val": ["B7Random"],
                                     "test": ["B1Counting", "B1Random", "B8Counting", "B8Random"]})
    split = dom.sequences.split()
    assert split["test"] == ["B1Counting", "B1Random", "B8Counting", "B8Random"]
    assert split["val"] == ["B7Random"]
    wider = synth.variant("stb-like", {"blocks": 8, "val": ["B7Random"]}).sequences.split()
    assert split["train"] == [s for s in wider["train"] if s not in ("B8Counting", "B8Random")]
    assert synth_source("stb-like", 320, 32, 1, knobs={"blocks": 8, "test": ["B1Random"]}) != \
        synth_source("stb-like", 320, 32, 1, knobs={"blocks": 8})


def test_address_changes_only_when_a_knob_is_set():
    assert synth_source("rhd-like", 100, 32, 0) == synth_source("rhd-like", 100, 32, 0, knobs={})
    assert "knobs" not in synth_source("rhd-like", 100, 32, 0)
    assert synth_source("rhd-like", 100, 32, 0, knobs={"distractors": 1})["knobs"] == {
        "distractors": 1}
    cfg = config.load("smoke", ["data.knobs.rhd-like.distractors=3"])
    assert config.knobs_of(cfg.data.source, cfg)["distractors"] == 3  # over the preset's 1
    assert config.knobs_of(cfg.data.source, config.load("paper")) == {}  # paper: none
    # per domain: a row that trains on another domain does not see rhd-like's knobs
    assert config.knobs_of(config.DataSpec(domain="freihand-g"), cfg) == {}


@pytest.mark.parametrize("setting, key", [
    ("data.knobs.rhd-like.distractors=-1", "data.knobs.rhd-like.distractors"),
    ("data.knobs.rhd-like.background=neon", "data.knobs.rhd-like.background"),
    ("data.knobs.rhd-like.blocks=8", "data.knobs.rhd-like.blocks"),
    ("data.knobs.stb-like.val=[B9Random]", "data.knobs.stb-like.val"),
    ("data.knobs.stb-like.val=[B1Random]", "data.knobs.stb-like.val"),
    ("data.knobs.stb-like.test=[B9Random]", "data.knobs.stb-like.test"),
    ("data.knobs.stb-like.test=[]", "data.knobs.stb-like.test"),
    ("data.knobs.rhd-like.test=[B1Random]", "data.knobs.rhd-like.test"),
    ("data.knobs.rhd-lik.distractors=1", "data.knobs.rhd-lik"),
    ("data.knobs.rhd-like.distractor=1", "data.knobs.rhd-like.distractor"),
])
def test_bad_knobs_name_their_key(setting, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load("smoke", [setting])
