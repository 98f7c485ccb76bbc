from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_the_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(cfg)
    validate_config(prepared)  # raises on any schema violation
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["resources"]["GPU"] == 0
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert any("pip install" in c and "~/cmkg" in c for c in prepared["setup_commands"])
    assert any("/mnt/cmkg" in c for c in prepared["setup_commands"])  # shared storage


def test_a_broken_cluster_yaml_is_rejected():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cfg["available_node_types"]["gpu_worker"]["min_wokers"] = 1  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cfg))
