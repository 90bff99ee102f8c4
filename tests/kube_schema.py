"""Strict, offline validation of Kubernetes manifests (a test helper; no cluster, no network).

A KubeRay resource (RayCluster, RayJob, RayCronJob) is validated against its CRD's
`spec.versions[].schema.openAPIV3Schema`, from the CRDs vendored in platform/kuberay/crds/. A core
resource (ConfigMap, Secret, CronJob, ...) is validated against Kubernetes' own API schemas for
KUBERNETES_VERSION, as the `kubernetes-validate` package (the dev extra) ships them: JSON Schema
generated from Kubernetes' OpenAPI document, one folder per release.

Why strict: JSON Schema ignores a property its schema does not name, and so does a CRD's schema on its
own, so a misspelt `shutdownAfterJobFinish` or an invented container field validates; the API server
then prunes the field without a word, and the mistake shows as a GPU cluster that never shuts down.
Here, as in the API server's pruning:
- an object schema that names `properties` and says nothing of `additionalProperties` (or
  `patternProperties`) is closed: a field it does not name is an error (with the nearest name it does);
- except where the schema says `x-kubernetes-preserve-unknown-fields: true`;
- `x-kubernetes-int-or-string: true` admits exactly integers and strings;
- a list with `x-kubernetes-list-type: map` has unique `x-kubernetes-list-map-keys` (env names,
  volume names, ports), one with `set` unique items;
- a resource's top-level `metadata` (which a CRD leaves as an open object) is checked against the core
  ObjectMeta.
CEL rules (`x-kubernetes-validations`) cannot be evaluated offline: a manifest that sets a field
carrying one fails, so nothing passes unchecked.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import ValidationError, validators
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "platform" / "kuberay" / "crds"
# The Kubernetes release whose core API (ConfigMap, Secret, batch/v1 CronJob, the pod template inside
# it, ObjectMeta) the manifests are checked against; its folder must be in the installed
# kubernetes-validate (1.37 ships 1.25 to 1.37).
KUBERNETES_VERSION = "1.34.0"
CORE_DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"  # the `$id` of that package's file

PRESERVE_UNKNOWN = "x-kubernetes-preserve-unknown-fields"
_open_properties = validators.Draft202012Validator.VALIDATORS["properties"]
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML


class SchemaNotFound(LookupError):
    """No vendored CRD and no core schema for a manifest's apiVersion and kind."""


class ManifestInvalid(ValueError):
    """A manifest breaks its schema; `problems` lists each way, as 'path: message'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source} does not validate:\n  " + "\n  ".join(problems))


# --- the strict keywords ------------------------------------------------------------------------------


def _closed_properties(validator: Any, properties: dict, instance: Any, schema: dict) -> Iterator:
    yield from _open_properties(validator, properties, instance, schema)
    if not validator.is_type(instance, "object"):
        return
    if "additionalProperties" in schema or "patternProperties" in schema or schema.get(PRESERVE_UNKNOWN):
        return
    for name in instance:
        if name in properties:
            continue
        nearest = difflib.get_close_matches(name, list(properties), n=1, cutoff=0.75)
        hint = f"did you mean {nearest[0]!r}?" if nearest else f"known: {', '.join(sorted(properties))}"
        yield ValidationError(f"unknown field {name!r} ({hint})", path=[name])


def _int_or_string(validator: Any, enabled: bool, instance: Any, schema: dict) -> Iterator:
    if not enabled or any(word in schema for word in ("anyOf", "oneOf", "type")):
        return  # controller-gen spells it out as anyOf: [integer, string] as well; that one reports
    if not (validator.is_type(instance, "integer") or validator.is_type(instance, "string")):
        yield ValidationError(f"{instance!r} is neither an integer nor a string")


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict) -> Iterator:
    if not validator.is_type(instance, "array") or list_type not in ("map", "set"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    first_index: dict[str, int] = {}
    for index, item in enumerate(instance):
        if list_type == "map":
            if not isinstance(item, Mapping):
                continue  # the items' own schema reports the type
            identity = json.dumps({key: item.get(key) for key in keys}, sort_keys=True)
        else:
            identity = json.dumps(item, sort_keys=True)
        if identity in first_index:
            yield ValidationError(
                f"item {index} repeats item {first_index[identity]} ({identity}): "
                f"a list of type {list_type!r} holds each key once"
            )
        first_index.setdefault(identity, index)


def _cel_rules(validator: Any, rules: list[dict], instance: Any, schema: dict) -> Iterator:
    listed = "; ".join(rule.get("rule", "?") for rule in rules)
    yield ValidationError(f"this field has CEL rules that are not checked offline ({listed}): leave it unset")


StrictValidator = validators.extend(
    validators.Draft202012Validator,
    {
        "properties": _closed_properties,
        "x-kubernetes-int-or-string": _int_or_string,
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-validations": _cel_rules,
    },
)


def strict_errors(schema: dict, instance: Any, registry: Registry | None = None) -> list[str]:
    """Every way `instance` breaks `schema` read strictly (see the module docstring), as 'path: message'."""
    validator = StrictValidator(schema, registry=registry if registry is not None else Registry())
    errors = sorted(validator.iter_errors(instance), key=lambda error: list(map(str, error.absolute_path)))
    return [f"{_dotted(error.absolute_path)}: {_message(error)}" for error in errors]


def _dotted(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(top)"


def _message(error: ValidationError) -> str:
    if not error.context:  # anyOf/oneOf: say why each branch failed, or the message says little
        return error.message
    return error.message + " (" + "; ".join(sorted({sub.message for sub in error.context})) + ")"


# --- where the schemas come from -----------------------------------------------------------------------


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of every vendored CRD."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_YAML_LOADER)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


@cache
def core_schemas() -> tuple[Registry, dict[tuple[str, str], str]]:
    """The core definitions as a registry, and (apiVersion, kind) -> the definition's name in it."""
    folder = (
        resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local"
    )
    definitions_file = folder / "_definitions.json"
    if not definitions_file.is_file():
        raise SchemaNotFound(
            f"kubernetes-validate has no schemas for Kubernetes {KUBERNETES_VERSION} (install the dev extra)"
        )
    document = json.loads(definitions_file.read_text())
    kinds = {}
    for name, definition in document["$defs"].items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            kinds.setdefault((api_version, gvk["kind"]), name)
    return Resource.from_contents(document) @ Registry(), kinds


def core_ref(definition: str) -> dict:
    """A schema that is the core definition named `definition` (e.g. io.k8s.api.core.v1.Container)."""
    return {"$ref": f"{CORE_DEFINITIONS_URI}#/$defs/{definition}"}


# --- manifests -----------------------------------------------------------------------------------------


def load_manifests(path: Path) -> list[dict]:
    """The resources in a YAML file (one per `---` document; empty documents skipped)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def schema_errors(manifest: Mapping[str, Any]) -> list[str]:
    """Every way `manifest` breaks the schema of its apiVersion and kind, strictly; [] when it is valid.

    Raises:
        SchemaNotFound: neither a vendored CRD nor the core API defines that apiVersion and kind.
    """
    key = (manifest.get("apiVersion"), manifest.get("kind"))
    registry, core_kinds = core_schemas()
    if key in core_kinds:
        problems = strict_errors(core_ref(core_kinds[key]), manifest, registry)
    elif key in crd_schemas():
        problems = strict_errors(crd_schemas()[key], manifest)
        # A CRD's schema leaves the resource's own metadata open; the API server checks it as ObjectMeta.
        metadata = manifest.get("metadata", {})
        object_meta = core_ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
        metadata_problems = strict_errors(object_meta, metadata, registry)
        problems += [f"metadata.{found}".replace("metadata.(top)", "metadata") for found in metadata_problems]
    else:
        raise SchemaNotFound(f"no schema for apiVersion {key[0]!r}, kind {key[1]!r}")
    if not isinstance(manifest.get("metadata"), Mapping) or not manifest["metadata"].get("name"):
        problems.append("metadata.name: every resource here is named (kubectl apply needs it)")
    return problems


def validate_manifest(manifest: Mapping[str, Any], source: str = "manifest") -> None:
    """Raise ManifestInvalid listing every problem, unless `manifest` validates strictly."""
    problems = schema_errors(manifest)
    if problems:
        raise ManifestInvalid(
            f"{source} ({manifest.get('kind')} {manifest.get('metadata', {}).get('name')})", problems
        )
