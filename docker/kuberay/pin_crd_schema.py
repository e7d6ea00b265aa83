"""Pin KubeRay's RayJob CRD schema for tests/test_docker.py: rayjob-crd.schema.json, offline."""

# Usage, from a KubeRay checkout (https://github.com/ray-project/kuberay), one LABEL=REF per
# release to check against (a tag, or master at a commit):
#   python docker/kuberay/pin_crd_schema.py KUBERAY_DIR v1.1.0=v1.1.0 master=<commit>
# Each is ray-operator/config/crd/bases/ray.io_rayjobs.yaml at that ref, its v1 openAPIV3Schema
# with the descriptions dropped (they are most of the 1.4 MB) and every repeated subtree of more
# than 1.5 kB (the pod templates' schemas, mostly) stored once under $defs, so the file stays small
# and a JSON Schema validator resolves it as the original.

from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

CRD_PATH = "ray-operator/config/crd/bases/ray.io_rayjobs.yaml"
OUT = Path(__file__).with_name("rayjob-crd.schema.json")
SHARED_BYTES = 1500


def _key(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def _subschemas(schema: dict[str, Any]) -> Iterator[tuple[str, str | int | None, Any]]:
    """(keyword, name or index or None, subschema) for each schema directly inside `schema`:
    only these may become a $ref (a `properties` map is not a schema, its values are)."""
    for keyword, value in schema.items():
        if keyword in ("properties", "patternProperties") and isinstance(value, dict):
            yield from ((keyword, name, sub) for name, sub in value.items())
        elif keyword in ("items", "additionalProperties", "not") and isinstance(value, dict):
            yield keyword, None, value
        elif keyword in ("allOf", "anyOf", "oneOf"):
            yield from ((keyword, i, sub) for i, sub in enumerate(value))


def compact_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """The CRD's v1 schema, descriptions dropped, repeated large subschemas moved to $defs."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _without_descriptions(version["schema"]["openAPIV3Schema"])
    counts: collections.Counter[str] = collections.Counter()

    def count(node: dict[str, Any]) -> None:
        counts[_key(node)] += 1
        for _, _, sub in _subschemas(node):
            count(sub)

    count(schema)
    defs: dict[str, Any] = {}
    names: dict[str, str] = {}

    def share(node: dict[str, Any], top: bool = False) -> dict[str, Any]:
        key = _key(node)
        if not top and counts[key] > 1 and len(key) > SHARED_BYTES:
            if key not in names:
                names[key] = f"s{hashlib.sha256(key.encode()).hexdigest()[:12]}"
                defs[names[key]] = share(node, top=True)
            return {"$ref": f"#/$defs/{names[key]}"}
        out = dict(node)
        for keyword, where, sub in _subschemas(node):
            if where is None:
                out[keyword] = share(sub)
            elif isinstance(where, int):
                out[keyword] = [*out[keyword]]
                out[keyword][where] = share(sub)
            else:
                out[keyword] = {**out[keyword], where: share(sub)}
        return out

    compact = share(schema, top=True)
    compact["$defs"] = defs
    return compact


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not all("=" in arg for arg in argv[1:]):
        print("usage: pin_crd_schema.py KUBERAY_DIR LABEL=REF [LABEL=REF ...]", file=sys.stderr)
        return 2
    checkout, pinned = argv[0], {}
    for arg in argv[1:]:
        label, ref = arg.split("=", 1)
        commit = subprocess.run(
            ["git", "-C", checkout, "rev-parse", f"{ref}^{{commit}}"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        text = subprocess.run(
            ["git", "-C", checkout, "show", f"{commit}:{CRD_PATH}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        pinned[label] = {
            "source": f"ray-project/kuberay {CRD_PATH} at {commit}",
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "schema": compact_schema(yaml.safe_load(text)),
        }
    OUT.write_text(json.dumps(pinned, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"{OUT}: {', '.join(pinned)} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
