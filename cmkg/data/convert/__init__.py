"""Converters from the published real datasets into the shard store (``cmkg data convert``).

    rhd       RHD: paired RGB + depth, the source set      -> one dataset folder
    stb       STB: RGB, the target set (paper split)       -> one dataset folder
    freihand  FreiHAND training set, versions g, h, s, a   -> DIR/freihand-<v> per version

Each reads the dataset's published folder layout (docs/hand-model.md; the module docstrings
list the files and the conventions chosen) and writes shards in the project's order and units: 21
joints in MANO/FreiHAND order, wrist root, mm in the colour camera's frame, images cropped
around the hand and resized (``common``). Point a stage at the folder with
``data: {source: {path: DIR}}`` or ``data: {target: {path: DIR}}``.
"""

from cmkg.data.convert import freihand, rhd, stb

CONVERTERS = {"rhd": rhd.convert, "stb": stb.convert, "freihand": freihand.convert}

__all__ = ["CONVERTERS", "freihand", "rhd", "stb"]
