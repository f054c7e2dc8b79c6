"""Worker config validation: every field, every error at once, each with file and line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from heddle.errors import ConfigFileError
from heddle.llm.config import WorkerConfig, load_prices, load_worker_config
from heddle.validate import validate_file
from tests.conftest import ROOT

BASE = {
    "name": "name: summarizer",
    "description": "description: Summarise a text.",
    "system_prompt": "system_prompt: Be brief.",
    "input_schema": "input_schema: {type: object, required: [text], properties: {text: {type: string}}}",
    "output_schema": "output_schema: {type: object, required: [summary], properties: {summary: {type: string}}}",
    "default_model_tier": "default_model_tier: local",
    "max_input_tokens": "max_input_tokens: 1000",
    "max_output_tokens": "max_output_tokens: 100",
    "temperature": "temperature: 0.2",
    "timeout_seconds": "timeout_seconds: 30",
    "retries": "retries: 2",
}


def render(changes: dict[str, str | None]) -> tuple[str, list[str]]:
    """YAML text of BASE with ``changes`` (None removes a key; new keys go last) and its key order."""
    merged = {**BASE, **changes}
    keys = [k for k, v in merged.items() if v is not None]
    return "\n".join(merged[k] for k in keys) + "\n", keys  # type: ignore[misc]


def test_a_complete_config_loads_with_every_field(tmp_path):
    text, _ = render({})
    path = tmp_path / "w.yaml"
    path.write_text(text)
    cfg = load_worker_config(path)
    assert cfg == WorkerConfig(
        name="summarizer",
        description="Summarise a text.",
        system_prompt="Be brief.",
        input_schema={"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
        output_schema={"type": "object", "required": ["summary"], "properties": {"summary": {"type": "string"}}},
        default_model_tier="local",
        max_input_tokens=1000,
        max_output_tokens=100,
        temperature=0.2,
        timeout_seconds=30.0,
        retries=2,
    )
    assert type(cfg.input_schema) is dict  # plain data, not the line-tracking mapping


def test_full_json_schema_and_the_new_keys_load(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(render({
        "output_schema": "output_schema:\n  type: object\n  $defs: {label: {type: string, enum: [a, b]}}\n"
                         "  properties:\n    label: {$ref: '#/$defs/label'}\n"
                         "    n: {oneOf: [{type: integer, minimum: 0}, {const: none}]}\n",
        "escalation": "escalation: [standard, frontier]",
        "structured_output": "structured_output: prompt",
    })[0])
    assert validate_file(path).issues == []
    cfg = load_worker_config(path)
    assert cfg.escalation == ("standard", "frontier") and cfg.structured_output == "prompt"
    assert cfg.output_validator().is_valid({"label": "a", "n": "none"})
    assert not cfg.output_validator().is_valid({"label": "c"})


def test_optional_fields_have_documented_defaults(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("\n".join(BASE[k] for k in ("name", "system_prompt", "input_schema", "output_schema")))
    cfg = load_worker_config(path)
    assert (cfg.description, cfg.default_model_tier, cfg.max_input_tokens, cfg.max_output_tokens) == (
        "", "standard", 8000, 1024)
    assert (cfg.temperature, cfg.timeout_seconds, cfg.retries) == (0.0, 120.0, 2)
    assert (cfg.escalation, cfg.structured_output, cfg.input_model, cfg.output_model) == ((), "auto", "", "")


CASES = [
    # (changes, key whose line is reported, dotted path, message)
    ({"name": None}, None, "name", "is required"),
    ({"name": "name: 42"}, "name", "name", "must be a string, got integer 42"),
    ({"name": "name: sum.v2"}, "name", "name", "may only contain letters, digits"),
    ({"description": "description: [a, b]"}, "description", "description", "must be a string, got list"),
    ({"system_prompt": None}, None, "system_prompt", "is required"),
    ({"system_prompt": 'system_prompt: "  "'}, "system_prompt", "system_prompt", "must not be empty"),
    ({"input_schema": None}, None, "input_schema", "is required"),
    ({"input_schema": "input_schema: text"}, "input_schema", "input_schema", "must be a JSON Schema mapping"),
    ({"input_schema": "input_schema: {type: string}"}, "input_schema", "input_schema",
     "must describe a JSON object"),
    ({"input_schema": "input_schema: {type: object, requird: [text]}"}, "input_schema", "input_schema.requird",
     "unsupported schema keyword 'requird'"),
    ({"input_schema": "input_schema: {type: object, required: [txt], properties: {text: {type: string}}}"},
     "input_schema", "input_schema.required[0]", "required property 'txt' is not in properties"),
    ({"output_schema": None}, None, "output_schema", "is required"),
    ({"output_schema": "output_schema: {type: object, properties: {n: {type: int}}}"}, "output_schema",
     "output_schema.properties.n.type", "type must be one of object, array, string"),
    ({"output_schema": "output_schema: {type: object, properties: {l: {enum: []}}}"}, "output_schema",
     "output_schema.properties.l.enum", "enum must be a non-empty list"),
    ({"output_schema": "output_schema: {type: object, properties: {s: {type: string, maxLength: -1}}}"},
     "output_schema", "output_schema.properties.s.maxLength", "maxLength must be an integer >= 0"),
    ({"output_schema": "output_schema: {type: object, properties: {s: {type: string, pattern: '(['}}}"},
     "output_schema", "output_schema.properties.s.pattern", "not a valid regular expression"),
    ({"output_schema": "output_schema: {type: object, properties: {a: {type: array, items: [{}]}}}"},
     "output_schema", "output_schema.properties.a.items", "for a tuple, list the schemas under prefixItems"),
    ({"output_schema": "output_schema: {type: object, properties: {a: {$ref: '#/$defs/b'}}, $defs: {c: {}}}"},
     "output_schema", "output_schema.properties.a.$ref", "$ref '#/$defs/b' does not resolve"),
    ({"output_schema": "output_schema: {type: object, properties: {a: {oneOf: [{type: strin}]}}}"},
     "output_schema", "output_schema.properties.a.oneOf[0].type", "type must be one of object"),
    ({"output_schema": "output_schema: {type: object, properties: {a: {type: string, patern: x}}}"},
     "output_schema", "output_schema.properties.a.patern", "did you mean 'pattern'?"),
    ({"output_schema": "output_schema: 'tests.no_such_module:Summary'"}, "output_schema", "output_schema",
     "cannot import 'tests.no_such_module' for the model 'tests.no_such_module:Summary'"),
    ({"output_schema": "output_schema: 'tests.test_llm_config:BASE'"}, "output_schema", "output_schema",
     "is dict {"),
    ({"escalation": "escalation: [standard, cloud]"}, "escalation", "escalation",
     "lists 'cloud'; each entry must be one of local, standard, frontier"),
    ({"escalation": "escalation: frontier"}, "escalation", "escalation", "must be a list of tiers"),
    ({"escalation": "escalation: [frontier, frontier]"}, "escalation", "escalation", "lists a tier twice"),
    ({"structured_output": "structured_output: json"}, "structured_output", "structured_output",
     "must be auto (the schema in the provider's own field where it can take one) or prompt"),
    ({"escalaton": "escalaton: [standard]"}, "escalaton", "escalaton", "did you mean 'escalation'?"),
    ({"structured_outputs": "structured_outputs: prompt"}, "structured_outputs", "structured_outputs",
     "did you mean 'structured_output'?"),
    ({"default_model_tier": "default_model_tier: cloud"}, "default_model_tier", "default_model_tier",
     "must be one of local, standard, frontier, got 'cloud'"),
    ({"max_input_tokens": "max_input_tokens: 0"}, "max_input_tokens", "max_input_tokens", "must be >= 1, got 0"),
    ({"max_input_tokens": "max_input_tokens: '1000'"}, "max_input_tokens", "max_input_tokens",
     "must be an integer, got string '1000'"),
    ({"max_output_tokens": "max_output_tokens: true"}, "max_output_tokens", "max_output_tokens",
     "must be an integer, got boolean True"),
    ({"max_output_tokens": "max_output_tokens: 1.5"}, "max_output_tokens", "max_output_tokens",
     "must be an integer, got number 1.5"),
    ({"temperature": "temperature: hot"}, "temperature", "temperature", "must be a number, got string 'hot'"),
    ({"temperature": "temperature: false"}, "temperature", "temperature", "must be a number, got boolean False"),
    ({"temperature": "temperature: 1.5"}, "temperature", "temperature", "must be >= 0 and <= 1, got 1.5"),
    ({"timeout_seconds": "timeout_seconds: 0"}, "timeout_seconds", "timeout_seconds", "must be > 0"),
    ({"timeout_seconds": "timeout_seconds: [30]"}, "timeout_seconds", "timeout_seconds", "must be a number"),
    ({"retries": "retries: -1"}, "retries", "retries", "must be from 0 to 10, got -1"),
    ({"retries": "retries: yes"}, "retries", "retries", "must be an integer, got boolean True"),
    ({"model": "model: gpt-4"}, "model", "model", "unknown key 'model'; known keys: budget_usd, default_model_tier"),
    ({"temprature": "temprature: 0.1"}, "temprature", "temprature", "did you mean 'temperature'?"),
]


@pytest.mark.parametrize(("changes", "line_key", "path", "message"), CASES,
                         ids=[f"{c[2]}:{c[3][:28]}" for c in CASES])
def test_each_field_is_checked_and_the_error_names_file_line_and_field(tmp_path, changes, line_key, path, message):
    text, keys = render(changes)
    file = tmp_path / "worker.yaml"
    file.write_text(text)
    report = validate_file(file)
    assert report.kind == "worker config"
    assert len(report.issues) == 1, report.issues
    (issue,) = report.issues
    expected_line = keys.index(line_key) + 1 if line_key else 1
    assert (issue.file, issue.line, issue.path) == (str(file), expected_line, path)
    assert message in issue.message
    assert str(issue).startswith(f"{file}:{expected_line}: {path}: ")


def test_every_error_in_a_file_is_reported_at_once_in_line_order(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad name\n"
        "descripton: typo\n"
        "system_prompt: Be brief.\n"
        "input_schema:\n"
        "  type: object\n"
        "  properties:\n"
        "    text:\n"
        "      type: strng\n"
        "output_schema: {type: object}\n"
        "retries: 1\n"
        "retries: 2\n"
    )
    with pytest.raises(ConfigFileError) as info:
        load_worker_config(path)
    lines = [(i.line, i.path) for i in sorted(info.value.issues, key=lambda i: i.line)]
    assert lines == [(1, "name"), (2, "descripton"), (8, "input_schema.properties.text.type"), (11, "")]
    assert "duplicate key 'retries' (first on line 10)" in str(info.value)
    assert str(info.value).startswith(f"4 error(s) in worker config {path}:")


def test_yaml_syntax_errors_and_missing_files_are_reported_with_their_place(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nsystem_prompt: [unclosed\noutput_schema: {}\n")
    report = validate_file(broken)
    assert report.issues[0].line >= 2 and "invalid YAML" in report.issues[0].message
    assert "file not found" in str(validate_file(tmp_path / "nope.yaml").issues[0])
    report = validate_file(_write(tmp_path / "list.yaml", "- system_prompt: x\n"))
    assert "cannot tell what kind of config this is" in report.issues[0].message


def _write(path, text):
    path.write_text(text)
    return path


def test_heddle_validate_prints_every_error_with_file_and_line_and_exits_non_zero(tmp_path):
    good = _write(tmp_path / "good.yaml", render({})[0])
    bad = _write(tmp_path / "bad.yaml", render({"temperature": "temperature: 3", "retries": "retries: x"})[0])
    out = subprocess.run([sys.executable, "-m", "heddle", "validate", str(good), str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{bad}:9: temperature: must be >= 0 and <= 1, got 3" in out.stdout
    assert f"{bad}:11: retries: must be an integer, got string 'x'" in out.stdout
    assert f"ok      {good}: worker config 'summarizer'" in out.stdout
    assert "1 valid, 1 invalid" in out.stdout
    ok = subprocess.run([sys.executable, "-m", "heddle", "validate", str(good)],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_the_shipped_worker_configs_and_the_llm_pipeline_are_valid():
    from heddle.graphs.pipeline import validate_pipeline_file

    for folder in (ROOT / "configs" / "workers", ROOT / "examples" / "llm"):
        files = sorted(f for f in folder.glob("*.yaml") if f.name != "pipeline.yaml")
        assert [f.stem for f in files] == ["classifier", "extractor", "summarizer"]
        for f in files:
            report = validate_file(f)
            assert (report.kind, report.issues) == ("worker config", [])
            assert load_worker_config(f).name == f.stem
    assert validate_pipeline_file(ROOT / "examples" / "llm" / "pipeline.yaml") == []


def test_a_price_table_reports_every_bad_entry_with_its_line(tmp_path):
    path = _write(tmp_path / "prices.yaml",
                  "good: {input_per_mtok: 1, output_per_mtok: 2}\n"
                  "bad:\n  input_per_mtok: -1\n  output_per_mtok: 2\n  per_call: 1\n"
                  "worse: 3\n")
    with pytest.raises(ConfigFileError) as info:
        load_prices(path)
    assert [(i.line, i.path) for i in info.value.issues] == [(5, "bad.per_call"), (3, "bad.input_per_mtok"),
                                                            (6, "worse")]
    prices = load_prices(_write(tmp_path / "ok.yaml", "m: {input_per_mtok: 3, output_per_mtok: 15}\n"))
    assert prices["m"].cost_usd(1_000_000, 1_000_000) == 18.0
