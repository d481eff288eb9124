import json
import subprocess
import sys

import pytest
import yaml

from dataengine.cli import main
from dataengine.engine.spec import SCHEMA_PATH, SpecError, json_schema, load_spec, parse_spec
from tests.conftest import REPO

GOOD = {"name": "t", "input": {"path": "in.parquet"}, "output": "runs/t",
        "stages": [{"op": "download"}, {"op": "download", "name": "second"}]}


def _problems(data) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    return e.value.problems


def test_good_spec_fills_img2dataset_defaults():
    spec = parse_spec(GOOD)
    assert spec.input.url_col == "url" and spec.input.caption_col == "caption"
    assert spec.stage_names() == ["download", "second"]
    assert spec.stages[0].image_size == 256 and spec.stages[0].resize_mode == "keep_ratio"


def test_error_names_field_path_value_and_bound():
    bad = json.loads(json.dumps(GOOD))
    bad["stages"][1]["image_size"] = -5
    assert _problems(bad) == ["stages[1].image_size: must be > 0, got -5"]


def test_unknown_keys_are_errors_and_list_allowed_keys():
    bad = json.loads(json.dumps(GOOD))
    bad["input"]["urlcol"] = "URL"
    bad["stages"][0]["imagesize"] = 3
    bad["extra"] = 1
    problems = _problems(bad)
    assert any(p.startswith("input.urlcol: unknown key (allowed: boxes_col, caption_col, format, id_col, path") for p in problems)
    assert any(p.startswith("stages[0].imagesize: unknown key (allowed:") and "image_size" in p for p in problems)
    assert any(p.startswith("extra: unknown key") for p in problems)


def test_unknown_op_and_missing_op():
    bad = json.loads(json.dumps(GOOD))
    bad["stages"][0] = {"op": "teleport"}
    bad["stages"][1] = {"image_size": 3}
    problems = _problems(bad)
    assert any(p.startswith("stages[0].op: unknown op 'teleport' (known: ") and "download" in p for p in problems)
    assert any(p.startswith("stages[1].op: required") for p in problems)


def test_wrong_types_and_literals():
    bad = json.loads(json.dumps(GOOD))
    bad["input"]["shard_rows"] = "many"
    bad["stages"][0]["resize_mode"] = "stretch"
    bad["stages"][0]["allow_private_networks"] = "perhaps"
    problems = _problems(bad)
    assert "input.shard_rows: must be an integer, got 'many'" in problems
    assert any(p.startswith("stages[0].resize_mode: must be one of") and "'keep_ratio'" in p and "got 'stretch'" in p
               for p in problems)
    assert "stages[0].allow_private_networks: must be true or false, got 'perhaps'" in problems


def test_missing_required_and_cross_field_rules():
    bad = json.loads(json.dumps(GOOD))
    del bad["output"]
    bad["stages"][0].update(timeout=60, deadline=10)
    problems = _problems(bad)
    assert "output: required, but missing" in problems
    assert "stages[0]: deadline (10.0) must be >= timeout (60.0)" in problems


def test_repeated_stage_names_are_errors():
    bad = json.loads(json.dumps(GOOD))
    bad["stages"][1]["name"] = None  # now two stages are called "download"
    (problem,) = _problems(bad)
    assert "stage name 'download' is already used by stages[0]" in problem


def test_top_level_must_be_mapping():
    assert _problems(["a", "b"]) == ["top level must be a mapping of keys, got list"]


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ninput: {path: a\nstages: [\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value) and "YAML syntax error" in str(e.value) and "line" in str(e.value)


@pytest.mark.parametrize("spec_file", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_yaml_validates(spec_file):
    spec = load_spec(spec_file)
    assert spec.stages


def test_json_schema_file_matches_code():
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), "run `dataengine schema --write`"


def test_json_schema_rejects_unknown_keys():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["DownloadConfig"]["additionalProperties"] is False


def test_validate_cli_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    broken = json.loads(json.dumps(GOOD))
    broken["stages"][1]["image_size"] = -5
    bad.write_text(yaml.safe_dump(broken))
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stages[1].image_size: must be > 0, got -5" in err


def test_bad_spec_from_the_shell_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ninput: {path: x}\noutput: o\nstages: [{op: download, threads: -1}]\n")
    proc = subprocess.run([sys.executable, "-m", "dataengine.cli", "run", str(bad)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "stages[0].threads: must be > 0, got -1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_spec_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read spec file" in capsys.readouterr().err


def test_spec_hash_ignores_output_but_not_stages():
    a = parse_spec(GOOD)
    b = parse_spec({**GOOD, "output": "elsewhere"})
    c = parse_spec({**GOOD, "stages": [{"op": "download", "image_size": 512}]})
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


def test_every_registered_op_config_builds_from_its_defaults_and_is_in_the_schema():
    from dataengine.ops import get_op, list_ops

    assert {"download", "caption_rules_filter", "perplexity_filter", "clip_score_filter", "dedup"} <= set(list_ops())
    defs = json_schema()["$defs"]
    for name in list_ops():
        config = get_op(name).Config()
        assert config.op == name and config.batch_size > 0
        assert any(d.get("properties", {}).get("op", {}).get("const") == name for d in defs.values()), name
