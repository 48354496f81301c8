"""One validated configuration for the CLI and the Snakefile.

Defaults live in the top-level ``config.yaml``; ``workflow/schemas/config.schema.yaml`` is the
single schema. CLI options are applied as dotted-key overrides, then the result is validated.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from scd_pipeline.engine.io import atomic_path
from scd_pipeline.errors import ConfigError

# Shipped inside the package (in a checkout these are links to the repository's config.yaml and
# workflow/schemas/config.schema.yaml, the files Snakemake reads; a wheel holds their content).
DEFAULTS_DIR = Path(__file__).parents[1] / "defaults"
DEFAULT_CONFIG = DEFAULTS_DIR / "config.yaml"
SCHEMA_PATH = DEFAULTS_DIR / "config.schema.yaml"

_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string",
               "boolean": "true or false", "array": "a list", "object": "a mapping", "null": "null"}


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def _key_path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        key = f"{where}.{extra[0]}" if error.absolute_path else extra[0]
        return f"config key {key}: unknown key (allowed here: {', '.join(allowed)})"
    if error.validator == "type":
        expected = error.validator_value
        expected = [expected] if isinstance(expected, str) else expected
        names = " or ".join(_TYPE_NAMES.get(t, t) for t in expected)
        hint = ("; YAML reads an unquoted yes / no / true / false as a boolean: quote it, e.g. \"yes\""
                if isinstance(error.instance, bool) and "string" in expected else "")
        return f"config key {where}: expected {names}, got {error.instance!r}{hint}"
    if error.validator == "enum":
        return f"config key {where}: {error.instance!r} is not one of {error.validator_value}"
    if error.validator == "required":
        return f"config key {where}: {error.message}"
    if error.validator == "anyOf":
        return f"config key {where}: expected {' or '.join(_alternative(s) for s in error.validator_value)}, got {error.instance!r}"
    return f"config key {where}: {error.message}"


def _alternative(node: dict) -> str:
    if "const" in node:
        return repr(node["const"])
    names = " or ".join(_TYPE_NAMES.get(t, t) for t in _types(node))
    return f"{names} >= {node['minimum']}" if "minimum" in node else names


def _types(node: dict) -> list[str]:
    if "anyOf" in node:
        return [t for alternative in node["anyOf"] for t in _types(alternative)]
    kind = node.get("type", [])
    return [kind] if isinstance(kind, str) else list(kind)


def coerce_types(value: Any, node: dict, root: dict) -> Any:
    """``value`` with strings read as YAML wherever the schema ``node`` expects no string.

    Snakemake hands nested ``--config`` values over as strings (``--config 'data={demo: {seed:
    7}}'`` gives ``seed: '7'``); a string that parses to a value of an expected type takes its
    place, anything else is left for the validator to report.
    """
    if "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    types = _types(node)
    if isinstance(value, str) and types and "string" not in types:
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, str) and ("number" in types or "integer" in types):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                parsed = float(parsed)
            except ValueError:
                return value
        checks = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
                  "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                  "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
                  "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict)}
        return parsed if any(checks[t](parsed) for t in types if t in checks) else value
    if isinstance(value, dict):
        properties = node.get("properties", {})
        for key in list(value):
            if key in properties:
                value[key] = coerce_types(value[key], properties[key], root)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        return [coerce_types(item, node["items"], root) for item in value]
    return value


def validate_config(config: dict) -> dict:
    """Raise ConfigError naming the first bad key path; return ``config`` otherwise.

    Strings where the schema wants a number, boolean, null, list or mapping are first read as YAML
    in place (:func:`coerce_types`), so Snakemake's nested ``--config`` values validate. Method
    strings in ``distill.methods`` are checked by the one method parser.
    """
    from scd_pipeline.engine.methods import parse_method

    schema = load_schema()
    coerce_types(config, schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(e.absolute_path)))
    if errors:
        raise ConfigError(_describe(errors[0]))
    curricula = []
    for method in config.get("distill", {}).get("methods", []):
        try:
            if parse_method(method).curriculum:
                curricula.append(method)
        except ConfigError as exc:
            raise ConfigError(f"config key distill.methods: {exc}") from None
    if curricula and config.get("evaluate", {}).get("split") == "val":
        raise ConfigError(f"config keys distill.methods ({', '.join(curricula)}) and evaluate.split: val: IOA's "
                          "mastery gates score the student on the validation split after every pass, so an "
                          "evaluation there grades what the curriculum steered by; set evaluate.split: test")
    return config


def set_dotted(config: dict, dotted: str, value: Any) -> None:
    """Set ``config['a']['b'] = value`` for ``dotted == 'a.b'`` (intermediate mappings are created)."""
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def get_dotted(config: dict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value`` (value read as YAML, so ``4``, ``null``, ``[0, 4]`` work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set data.max_length=256")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
    return key.strip(), value


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error: PyYAML keeps the
    last value silently, so a pasted line would override the one above it unseen."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{Path(self.name)}: line {key_node.start_mark.line + 1}: key {key!r} repeats "
                                  f"line {seen[key] + 1} of the same mapping; keep one of them")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found (pass --config PATH or create config.yaml)")
    try:
        with path.open(encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """The shipped defaults (the repository's config.yaml), then the user's file, then dotted overrides."""
    config = read_yaml(DEFAULT_CONFIG)
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG.resolve():
        config = deep_merge(config, read_yaml(path))
    for key, value in (overrides or {}).items():
        set_dotted(config, key, value)  # None is a real value here (e.g. --set distill.phases=null)
    return validate_config(config)


def task_dir(config: dict) -> Path:
    return Path(config["results_dir"]) / config["task"]


def write_effective_config(config: dict, out_dir: str | Path, stage: str) -> Path:
    """Write the config a stage actually ran with, as ``{out_dir}/{stage}.config.yaml``."""
    target = Path(out_dir) / f"{stage}.config.yaml"
    with atomic_path(target) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return target
