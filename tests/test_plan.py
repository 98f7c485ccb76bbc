"""The stage plan, key hygiene and one writer per key."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cmkg import config, stages
from cmkg.config import Config

# Config fields that are in no stage's key, each with the reason it cannot change a result.
NOT_IN_KEY = {
    "data.root": "where synthetic sets are cached; the set is addressed by its generator config",
    "run.device": "the same computation on another device (float rounding aside)",
    "run.threads": "torch intra-op threads: speed only",
    "run.store": "where artifacts are kept",
    "run.cache": "the local mirror of a remote store",
    "run.loader_workers": "loader processes: the batches and their order are the same",
    "run.progress": "console output only",
    "run.tracking.backend": "experiment tracking (cmkg.tracking) only records what a stage does",
    "run.tracking.uri": "where the tracker keeps its runs",
    "preset": "a name for the values it sets, which are hashed themselves",
    "inputs.teacher": "an explicit input enters the key as that artifact's key (plan())",
    "inputs.student": "likewise",
    "regularizer.prior": "likewise",
}


def _leaves(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, key + ".")
        else:
            yield key, value


def _perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1e-3
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:1] if len(value) > 1 else value * 2
    return value


def _set(cfg: Config, dotted: str, value) -> Config:
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _set(getattr(cfg, head), rest, value)})


def _keys(cfg: Config) -> dict[str, str]:
    return {s: config.digest(stages.stage_spec(s, cfg, {"dep": "k"})) for s in stages.STAGES}


def test_every_config_field_is_hashed_or_declared_result_neutral(tmp_path):
    """A field that changes no key must be on NOT_IN_KEY, and one on the list must change none:
    a cached artifact can never be reused for a config that would train differently."""
    bases = [config.load("smoke", [f"data.root={tmp_path}", "regularizer.form=weighted_l2"]),
             config.load("smoke", [f"data.root={tmp_path}", "regularizer.form=l2",
                                   "data.augment={domain: augment, num: 100, size: 32}"]),
             # d_cap acts (and is hashed) only with a calibrated prior
             config.load("smoke", [f"data.root={tmp_path}", "regularizer.form=weighted_l2",
                                   "regularizer.calibrate_d=1.0"]),
             # how a target applies phi: strength and prior_seed are null at their defaults
             config.load("smoke", [f"data.root={tmp_path}", "regularizer.form=weighted_l2",
                                   "regularizer.strength=10.0", "regularizer.prior_seed=5",
                                   "regularizer.phi_control=other_seed"]),
             # phi_eps is read (and hashed) only with a phi source other than meta
             config.load("smoke", [f"data.root={tmp_path}", "regularizer.form=weighted_l2",
                                   "regularizer.phi_source=oracle"]),
             # the planted channels' cue and seed are read (and hashed) only with channels on
             config.load("smoke", [f"data.root={tmp_path}", "data.planted.channels=2"]),
             # average_epochs is read (and hashed) only with keep: average
             config.load("smoke", [f"data.root={tmp_path}", "optim.keep=average",
                                   "optim.average_epochs=1"])]
    from cmkg.data import synthesize

    folder = tmp_path / "set"
    synthesize(folder, "freihand-g", 20, 16, progress=False)  # a shard folder: its fingerprint
    hashed, unhashed = set(), set()
    for base in bases:
        for key, value in _leaves(base):
            if key in ("data.augment", "inputs.teacher", "inputs.student", "regularizer.prior"):
                continue
            new = {"run.cache": "/elsewhere", "run.tracking.uri": "http://elsewhere:5000",
                   "regularizer.phi_clip": [-1.0, 1.0],
                   "meta.order_seed": 7,
                   "data.knobs": {"rhd-like": config.DomainKnobs(distractors=3),
                                  "stb-like": config.DomainKnobs(blocks=8)},
                   "data.source.path": str(folder), "data.target.path": str(folder)}.get(key, _perturbed(value))
            if key.endswith(".domain"):
                new = "freihand-g"
            if new == value:
                continue
            (hashed if _keys(_set(base, key, new)) != _keys(base) else unhashed).add(key)
    unhashed -= hashed  # e.g. regularizer.sigma matters for l2 only
    declared = {k for k in NOT_IN_KEY if not k.startswith(("inputs.", "regularizer.prior"))}
    assert "run.eval_every" in hashed
    assert unhashed - {"preset"} == declared - {"preset"}, (
        f"fields in no key but not declared result-neutral: {sorted(unhashed - declared)}; "
        f"declared neutral but hashed: {sorted(declared & hashed)}")
    # every leaf is accounted for
    every = {k for k, _ in _leaves(bases[0])} - {"data.augment"}
    assert every <= hashed | set(NOT_IN_KEY), sorted(every - hashed - set(NOT_IN_KEY))


def test_plan_dependency_order_and_dedup(tiny_cfg):
    nodes = stages.plan("target", dataclasses.replace(
        tiny_cfg, regularizer=dataclasses.replace(tiny_cfg.regularizer, form="weighted_l2")))
    assert [n.stage for n in nodes] == ["teacher", "student", "meta", "target"]
    assert len({n.id for n in nodes}) == 4
    meta, target = nodes[2], nodes[3]
    assert meta.inputs == {"teacher": nodes[0].key, "student": nodes[1].key}
    assert target.inputs == {"meta": meta.key}
    assert stages.stage_key("target", nodes[-1].cfg)[0] == target.key
    plain = stages.plan("target", dataclasses.replace(
        tiny_cfg, regularizer=dataclasses.replace(tiny_cfg.regularizer, form="none")))
    assert [n.stage for n in plain] == ["target"]


_CHILD = textwrap.dedent("""
    import sys
    from cmkg import config, stages
    cfg = config.load("smoke", sys.argv[1:])
    print("ARTIFACT", stages.run_stage("teacher", cfg).path, flush=True)
""")


@pytest.mark.slow
def test_two_processes_one_writer(tmp_path):
    """Two processes ask for the same missing teacher at once: it is trained once, the second
    waits for the first and takes the cache hit, both get the same artifact."""
    args = ["data.source.num=300", "epochs.teacher=3", "optim.batch_size=16", "run.threads=1",
            f"data.root={tmp_path / 'data'}", f"run.store={tmp_path / 'runs'}",
            "run.progress=lines"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    err = "".join(o[1] for o in outs)
    assert err.count("teacher: training") == 1, err
    assert err.count("epoch   1/3") == 1, err  # one run's epochs, not two
    paths = {line.split(" ", 1)[1] for o in outs for line in o[0].splitlines()
             if line.startswith("ARTIFACT")}
    assert len(paths) == 1
    assert (Path(paths.pop()) / "model.pt").is_file()
    assert "waiting for it" in err or "cached" in err
